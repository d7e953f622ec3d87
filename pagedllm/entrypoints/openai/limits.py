"""The request-body limit: a body over `max_bytes` gets 413 without being read whole.

A body that declares its size (Content-Length) is refused on its headers alone; a chunked
upload is counted as it arrives and refused at the chunk that crosses the limit. Either
way the server holds at most `max_bytes` of it, and the connection is closed after the 413
(the rest of the body is never read).

The default allows the longest prompt the engine takes, written out in the most verbose
way a client could (a token costs ~1-8 bytes of text, or a list entry of up to 7 digits;
64 bytes a token covers escaped Unicode too), plus a few MiB for everything else a body
carries (chat structure, tools, a batch of prompts).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import APIError

_BYTES_PER_TOKEN = 64
_HEADROOM_BYTES = 4 * 2**20


def default_max_body_bytes(max_model_len: int) -> int:
    return _HEADROOM_BYTES + _BYTES_PER_TOKEN * max_model_len


class RequestTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RequestBodyLimit:
    """ASGI middleware: 413 (in OpenAI's error shape) for a body over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await self._refuse(int(length), scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server reads no more than it declares
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)  # no body at all
            return
        # Chunked: count while reading; the app parses the whole body anyway, so holding it
        # here first costs nothing, and then it is replayed to the app in one piece.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(None, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, length: int | None, scope: Scope, receive: Receive, send: Send) -> None:
        size = f"has {length} bytes, more than" if length is not None else "is larger than"
        error = RequestTooLargeError(
            f"the request body {size} the {self.max_bytes} bytes the server accepts: send a shorter prompt "
            "or fewer prompts per request, or start the server with a larger --max-request-body-bytes"
        )
        response = error.response()
        response.headers["connection"] = "close"  # the rest of the body stays unread
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message, then the client's own messages (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
