"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every
failure a client can meet: our own, FastAPI's validation errors, unknown routes, and bugs."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("pagedllm")


class APIError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status_code)


class BadRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class EngineUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "engine_dead"


def validation_error(exc: RequestValidationError) -> BadRequestError:
    """One readable sentence from pydantic's list of errors."""
    errors = exc.errors()
    messages, params = [], []
    for error in errors[:3]:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = loc[0] if loc else None
        kind = error.get("type", "")
        if kind == "json_invalid":
            detail = error.get("ctx", {}).get("error", "")
            return BadRequestError(f"the request body is not valid JSON ({detail}): send a JSON object", code="invalid_json")
        if kind == "missing" and field is None:
            return BadRequestError("the request has no body: send a JSON object with Content-Type: application/json")
        if kind == "extra_forbidden":
            messages.append(f"unknown field {'.'.join(loc)!r}: remove it (see docs/server.md for the accepted fields)")
        elif kind == "missing":
            messages.append(f"field {'.'.join(loc)!r} is required")
        else:
            messages.append(f"{'.'.join(loc) or 'body'}: {error.get('msg')} (got {_short(error.get('input'))})")
        if field is not None and field not in params:
            params.append(field)
    if len(errors) > 3:
        messages.append(f"and {len(errors) - 3} more")
    return BadRequestError("; ".join(messages), param=params[0] if params else None)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error: APIError = NotFoundError(f"no route {request.method} {request.url.path}: see GET /docs for the routes")
        else:
            error = APIError(str(exc.detail))
            error.status_code = exc.status_code
            error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error.response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(f"internal server error ({type(exc).__name__}: {exc}); the server keeps running").response()
