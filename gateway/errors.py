"""The error responses of every error path of the gateway, in the dialect of the URL asked
(OpenAI's body; Anthropic's on /v1/messages; Ollama's on /api/), and the one reading of an
exception as the status a request ends with.

Every error is first an OpenAI error (status, message, type, param, code: what APIError
carries); `error_payload` words it in a dialect. That is the one builder of error bodies."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from backends.protocol import APIError, error_body
from gateway.fastpath import route_path

log = logging.getLogger("turnout.errors")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

CLIENT_CLOSED = 499  # nginx's code for a client that left before its answer


Dialect = Literal["openai", "anthropic", "ollama"]

# Anthropic's error types (docs.anthropic.com, "Errors"), by status.
_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def dialect_of(path: str) -> Dialect:
    """The dialect a URL path speaks, and so the shape of its errors."""
    if path.startswith("/api/"):
        return "ollama"
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai"


def error_payload(
    dialect: Dialect, status: int, message: str, type: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An error's body in `dialect`: OpenAI's `{"error": {message, type, param, code}}`,
    Anthropic's `{"type": "error", "error": {type, message}}`, Ollama's `{"error": message}`."""
    if dialect == "ollama":
        return {"error": message}
    if dialect == "anthropic":
        kind = _ANTHROPIC_TYPE_BY_STATUS.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    return error_body(message, type or _TYPE_BY_STATUS.get(status, "server_error"), param=param, code=code)


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    dialect: Dialect = "openai",
) -> JSONResponse:
    """A JSON error response in `dialect` (OpenAI's `type` defaults from the status)."""
    return JSONResponse(error_payload(dialect, status, message, type, param, code), status_code=status, headers=headers)


def api_error_response(exc: APIError, dialect: Dialect = "openai") -> JSONResponse:
    """The response for an APIError: its status, body (in `dialect`) and headers (Retry-After)."""
    body = exc.body() if dialect == "openai" else error_payload(dialect, exc.status, exc.message, exc.type, exc.param, exc.code)
    return JSONResponse(body, status_code=exc.status, headers=exc.response_headers() or None)


def _dialect(request: Request) -> Dialect:
    return dialect_of(route_path(request.scope))


def status_of(exc: BaseException) -> tuple[int, str | None]:
    """The status and error code a request that failed with `exc` is logged and counted with."""
    if isinstance(exc, APIError):
        return exc.status, exc.code
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, ClientDisconnect)):
        return CLIENT_CLOSED, "client_closed_request"
    return 500, None


# pydantic names the member of a union each of its errors came from, in the error's location
# (`stop.str`, `prompt.list[constrained-int].0`). Field names never look like these.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def _union_prefix(loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The location of the union an error is under (None: it is under none)."""
    for index, part in enumerate(loc):
        if _is_union_tag(part):
            return loc[:index]
    return None


def _first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report. A value that fits no member of a union gets one error per
    member; the member whose type the value had says what is wrong with it (a 5-item `stop`
    list is too long, not "not a string"): an error that is not a type mismatch wins, then
    a mismatch inside a member (`stop: ["a", 5]`: item 1), then the first."""
    first = errors[0]
    union = _union_prefix(tuple(first.get("loc", ())))
    if union is None:
        return first
    same = [e for e in errors if _union_prefix(tuple(e.get("loc", ()))) == union]
    mismatch = [str(e.get("type", "")).endswith("_type") for e in same]
    inside = [len(e.get("loc", ())) > len(union) + 1 for e in same]
    return next(
        (e for e, m in zip(same, mismatch) if not m),
        next((e for e, i in zip(same, inside) if i), first),
    )


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first validation error as OpenAI words it: a message and the offending param
    (a dotted path such as `messages.0.content`, union members left out)."""
    err = _first_error(errors)
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    if err.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {err.get('ctx', {}).get('error', err['msg'])}", None
    param = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") == "missing":
        if param is None:  # the body itself (gateway.body: an empty body is a missing one)
            return "We could not parse the JSON body of your request: the body is empty; expected a JSON object.", None
        return f"Missing required parameter: '{param}'.", param
    if param is None:
        return f"Invalid request body: {msg}", None
    return f"Invalid value for '{param}': {msg}", param


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise to an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc, _dialect(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, param=param, dialect=_dialect(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "Unknown request URL. Please check the URL and method."
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None), dialect=_dialect(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        # This handler runs outside the request-id middleware, so it sets the header itself.
        request_id = request.scope.get("state", {}).get("request_id", "")
        return error_response(
            500, "The server had an error while processing your request.", headers={"x-request-id": request_id}, dialect=_dialect(request)
        )
