"""Graceful shutdown: on SIGTERM (or Ctrl-C) the server stops taking requests, lets the
running ones finish for up to `--shutdown-timeout` seconds, then ends the rest with
finish_reason "abort", closes its connections and stops the engine.

    SIGTERM ─► listening socket closed: new connections are refused
               a new request on a connection already open: 503 (DrainGate)
               running requests: finish, or at the timeout end with finish_reason "abort"
               uvicorn's own shutdown: connections closed, then the engine process stops

A second Ctrl-C skips the wait (uvicorn's force_exit).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.engine.async_client import AsyncEngineClient
from pagedllm.entrypoints.openai.errors import EngineUnavailableError

logger = logging.getLogger("pagedllm")

FLUSH_TIMEOUT_S = 5.0  # after the aborts, for handlers to send their last chunks


@dataclass
class ShutdownState:
    draining: bool = False


class DrainGate:
    """ASGI middleware: 503 for every request that arrives once the server is draining
    (/metrics stays open, so the drain can be watched)."""

    def __init__(self, app: ASGIApp, state: ShutdownState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.state.draining and scope["type"] == "http" and scope["path"] != "/metrics":
            error = EngineUnavailableError("the server is shutting down: send the request to another replica", code="shutting_down")
            response = error.response()
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class GracefulServer(uvicorn.Server):
    """uvicorn, with the engine's running requests drained before it closes connections."""

    def __init__(self, config: uvicorn.Config, client: AsyncEngineClient, state: ShutdownState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.client = client
        self.state = state
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.draining = True
        for server in self.servers:  # refuse new connections now, not after the drain
            server.close()
        await self._drain()
        await super().shutdown(sockets)

    async def _drain(self) -> None:
        client = self.client
        if not client.num_open_requests:
            return
        logger.info("shutting down: waiting up to %g s for %d running requests", self.shutdown_timeout, client.num_open_requests)
        deadline = time.monotonic() + self.shutdown_timeout
        while client.num_open_requests and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        if client.num_open_requests:
            logger.warning("shutting down: aborting %d requests still running", client.num_open_requests)
            client.abort_all()
