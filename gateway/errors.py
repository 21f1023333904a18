"""OpenAI-shaped error responses for every error path of the gateway, and the one reading of
an exception as the status a request ends with."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from backends.protocol import APIError, error_body

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


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON response with OpenAI's error body (`type` defaults from the status)."""
    body = error_body(message, type or _TYPE_BY_STATUS.get(status, "server_error"), param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


def api_error_response(exc: APIError) -> JSONResponse:
    """The response for an APIError: its status, body and headers (Retry-After)."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.response_headers() or None)


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
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "Unknown request URL. Please check the URL and method."
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        # This handler runs outside the request-id middleware, so it sets the header itself.
        request_id = request.scope.get("state", {}).get("request_id", "")
        return error_response(
            500, "The server had an error while processing your request.", headers={"x-request-id": request_id}
        )
