"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, for every failure the
server answers: malformed JSON and schema errors (400), unknown model or route (404), what the
engine refuses at submit (ValueError: 400), a full queue (QueueFull: 429), a stopped engine
(EngineStopped: 503). Clients (the `openai` package among them) turn these into typed exceptions
(BadRequestError, NotFoundError, RateLimitError, ...), so the status codes matter as much as the text.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanojax.infer.scheduler import EngineStopped, QueueFull

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """Raised by a handler to answer `status` with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location ("body", "messages", 0, "role") -> OpenAI's param "messages.0.role"."""
    parts = [str(p) for p in loc if p != "body"]
    # a union field reports the member type it tried ("max_tokens", "int"): keep the field path only
    parts = [p for p in parts if p not in ("int", "str", "float", "bool", "list[int]", "list[str]",
                                           "list[list[int]]", "constrained-int", "constrained-float")]
    return ".".join(parts) or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first schema error as (message, param); a body that is not JSON says so."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return (f"the request body is not valid JSON ({detail}); send a JSON object with "
                "Content-Type: application/json"), None
    param = _loc_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{param}: {msg}, got {first.get('input')!r}{more}", param


def install_handlers(app: FastAPI) -> None:
    """Every error the app can raise answers with the OpenAI body."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _schema(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param, "invalid_value" if param else "invalid_json")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}; see /v1/models, /v1/completions, "
                   "/v1/chat/completions, /health, /metrics" if exc.status_code in (404, 405)
                   else str(exc.detail))
        return error_response(exc.status_code, message, None, None)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(429, f"the server is busy: {exc}; retry after a short wait", None,
                              "queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return error_response(503, f"the server is shutting down and takes no new requests ({exc})",
                              None, "engine_stopped")
