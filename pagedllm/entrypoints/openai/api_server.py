"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an engine core process.

    pagedllm serve [MODEL] [options]
    python -m pagedllm.entrypoints.openai.api_server --model MODEL [options]

The port is bound before the model loads (so a taken port fails at once), the engine
process starts next, then uvicorn serves until SIGINT / SIGTERM, and the engine stops.
With --api-server-count K > 1 this process becomes the parent of K such servers on the
same port (api_servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import pagedllm
from pagedllm.config import EngineArgs
from pagedllm.engine.async_client import AsyncEngineClient, EngineStartError
from pagedllm.engine.dp_client import DataParallelClient
from pagedllm.entrypoints.cli_args import add_engine_args, add_server_args, chat_options_from, engine_args_from
from pagedllm.entrypoints.openai.errors import AuthenticationError, BadRequestError, EngineUnavailableError, install_error_handlers
from pagedllm.entrypoints.openai.limits import RequestBodyLimit, default_max_body_bytes
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.protocol_responses import ResponsesRequest
from pagedllm.entrypoints.openai.serving_chat import ChatHandler, ChatOptions, render_chat
from pagedllm.entrypoints.openai.serving_common import check_model
from pagedllm.entrypoints.openai.serving_completion import CompletionHandler
from pagedllm.entrypoints.openai.shutdown import FLUSH_TIMEOUT_S, DrainGate, GracefulServer, ShutdownState
from pagedllm.entrypoints.openai.serving_responses import ResponsesHandler
from pagedllm.entrypoints.openai.sse import ClientDisconnected
from pagedllm.entrypoints.openai.web_ui import WEB_UI_PATHS, add_web_ui_routes, page_url
from pagedllm.logger import init_logging
from pagedllm.metrics import ServerMetrics

logger = logging.getLogger("pagedllm")

OPEN_PATHS = frozenset({"/health", "/version", "/metrics", "/ping"}) | WEB_UI_PATHS  # no API key needed


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>`; health, version and metrics stay open."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "missing API key: send 'Authorization: Bearer <key>'" if not given else "wrong API key"
                await AuthenticationError(message).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class APIServerHeader:
    """ASGI middleware: every response names the API server process that answered it
    (`x-pagedllm-api-server: k`), to see how connections spread over the processes."""

    def __init__(self, app, index: int) -> None:
        self.app = app
        self.header = (b"x-pagedllm-api-server", str(index).encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


def build_app(
    client: AsyncEngineClient | DataParallelClient,
    api_key: str | None = None,
    web_ui: bool = True,
    max_request_body_bytes: int | None = None,
    chat_options: ChatOptions = ChatOptions(),
    api_server: int | None = None,
) -> FastAPI:
    """The app around a started engine client (the caller owns the client's life).
    api_server: this process's index when it is one of several API servers."""
    app = FastAPI(title="pagedllm", version=pagedllm.__version__)
    app.state.shutdown = ShutdownState()
    app.state.client = client
    app.state.metrics = ServerMetrics(client.info.model_name, api_server)
    client.observe(app.state.metrics)
    app.state.completions = CompletionHandler(client, client.info.model_name)
    app.state.chat = ChatHandler(client, client.info.model_name, chat_options)
    app.state.responses = ResponsesHandler(client, client.info.model_name, chat_options)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    # Added last = runs first: a draining server or an oversized body is refused before anything.
    max_body = max_request_body_bytes or default_max_body_bytes(client.info.max_model_len)
    app.add_middleware(RequestBodyLimit, max_bytes=max_body)
    app.add_middleware(DrainGate, state=app.state.shutdown)
    if api_server is not None:
        app.add_middleware(APIServerHeader, index=api_server)
    _add_routes(app)
    if web_ui:
        add_web_ui_routes(app)
    return app


def _client(request: Request) -> AsyncEngineClient:
    client: AsyncEngineClient = request.app.state.client
    if client.dead_error is not None:
        raise EngineUnavailableError(f"{client.dead_error}: restart the server")
    return client


async def _create(handler, body, request: Request) -> Response:
    """A generation route: the handler's answer, or 499 if the client left while waiting."""
    _client(request)
    try:
        return await handler.create(body, request)
    except ClientDisconnected:
        return Response(status_code=499)


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        # With data parallelism: 503 once any replica is dead, while the others still serve.
        error = request.app.state.client.health_error
        if error is not None:
            raise EngineUnavailableError(f"{error}: restart the server")
        return JSONResponse({"status": "ok"})

    @app.get("/ping")
    async def ping(request: Request) -> Response:
        return await health(request)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": pagedllm.__version__})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        m: ServerMetrics = request.app.state.metrics
        return Response(m.render(), media_type=m.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        info = request.app.state.client.info
        return JSONResponse(ModelList(data=[ModelCard(id=info.model_name, max_model_len=info.max_model_len)]).model_dump())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _create(request.app.state.completions, body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await _create(request.app.state.chat, body, request)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await _create(request.app.state.responses, body, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request) -> Response:
        return request.app.state.responses.retrieve(response_id)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        client = _client(request)
        check_model(body.model, client.info.model_name)
        if client.tokenizer is None:
            raise BadRequestError("the engine runs without a tokenizer (skip_tokenizer_init)")
        if (body.prompt is None) == (body.messages is None):
            raise BadRequestError("give either prompt or messages", param="prompt")
        if body.messages is not None:
            tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in body.tools or []]
            ids = render_chat(client.tokenizer, body.messages, body.add_generation_prompt, body.chat_template_kwargs, tools)
        else:
            ids = client.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = client.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=client.info.max_model_len, tokens=ids, token_strs=strs).model_dump())

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
        client = _client(request)
        check_model(body.model, client.info.model_name)
        if client.tokenizer is None:
            raise BadRequestError("the engine runs without a tokenizer (skip_tokenizer_init)")
        vocab = len(client.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise BadRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return JSONResponse(DetokenizeResponse(prompt=client.tokenizer.decode(body.tokens)).model_dump())


# -- running it ---------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port} ({e.strerror}): stop what uses the port or pass --port") from e
    sock.set_inheritable(False)
    return sock


def run_server(args: argparse.Namespace) -> None:
    """Bind the port, start the engine, serve until SIGINT / SIGTERM, stop the engine."""
    init_logging()
    engine_args = engine_args_from(args)
    if args.data_parallel_size < 1:
        raise SystemExit(f"error: --data-parallel-size must be at least 1, got {args.data_parallel_size}")
    api_server_count = args.data_parallel_size if args.api_server_count is None else args.api_server_count
    if api_server_count < 1:
        raise SystemExit(f"error: --api-server-count must be at least 1, got {api_server_count}")
    if args.timeout_keep_alive <= 0:
        raise SystemExit(f"error: --timeout-keep-alive must be positive, got {args.timeout_keep_alive:g}")
    chat_options = chat_options_from(args)
    sock = bind_socket(args.host, args.port)
    if api_server_count > 1:
        from pagedllm.entrypoints.openai.api_servers import run_api_servers

        try:
            sys.exit(run_api_servers(args, engine_args, chat_options, sock, api_server_count))
        finally:
            sock.close()
    serve_until_stopped(_serve(args, engine_args, chat_options, sock), sock)


def serve_until_stopped(serving: Coroutine[Any, Any, None], sock: socket.socket) -> None:
    """Run `serving` (start or reach the engine, then serve on `sock`); an engine that fails to
    start, or Ctrl-C while it loads, ends the process with a message and an exit code."""
    try:
        asyncio.run(serving)
    except EngineStartError as e:
        logger.error("%s", e)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        sock.close()


async def _serve(args: argparse.Namespace, engine_args: EngineArgs, chat_options: ChatOptions, sock: socket.socket) -> None:
    if args.data_parallel_size > 1:
        client = await DataParallelClient.start(engine_args, args.data_parallel_size)
    else:
        client = await AsyncEngineClient.start(engine_args)
    await serve_client(args, client, chat_options, sock)


async def serve_client(
    args: argparse.Namespace,
    client: AsyncEngineClient | DataParallelClient,
    chat_options: ChatOptions,
    sock: socket.socket,
    api_server: int | None = None,
) -> None:
    """Serve the app around a ready client on a bound socket until SIGINT / SIGTERM; then
    shut the client down. api_server: this process's index when it is one of several."""
    # uvicorn re-raises the SIGTERM it caught once it has shut down; by then stopping is
    # under way, and the default action would kill us before the engine is stopped.
    previous_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        app = build_app(
            client, api_key=args.api_key, web_ui=args.web_ui, max_request_body_bytes=args.max_request_body_bytes,
            chat_options=chat_options, api_server=api_server,
        )
        config = uvicorn.Config(
            app,
            log_level=args.log_level,
            access_log=args.access_log,
            timeout_keep_alive=args.timeout_keep_alive,
            timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
        )
        if not api_server:  # one process says where it serves
            host = f"[{args.host}]" if ":" in args.host else args.host
            logger.info(
                "serving %r at http://%s:%d (OpenAI API under /v1; /health, /metrics; API key %s%s)",
                client.info.model_name, host, args.port, "required" if args.api_key else "not required",
                f"; {args.data_parallel_size} data-parallel replicas" if args.data_parallel_size > 1 else "",
            )
            if args.web_ui:
                logger.info("chat page at %s", page_url(args.host, args.port))
        await GracefulServer(config, client, app.state.shutdown, args.shutdown_timeout).serve(sockets=[sock])
    finally:
        await client.shutdown()
        signal.signal(signal.SIGTERM, previous_sigterm)
        logger.info("engine stopped" if api_server is None else f"API server {api_server} stopped")


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="OpenAI-compatible server for pagedllm", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_args(parser)
    add_server_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_server(make_parser("python -m pagedllm.entrypoints.openai.api_server").parse_args(argv))


if __name__ == "__main__":
    main()
