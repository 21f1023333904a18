"""The one reading of an exception: the status and code a request ends with, and its body."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import ClientDisconnect

from backends.protocol import ContextLengthExceeded, Overloaded
from gateway.auth import AuthError, ModelForbidden
from gateway.errors import api_error_response, status_of
from gateway.ratelimit import LimiterUnavailable, RateLimited


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ContextLengthExceeded("too long"), 400, "context_length_exceeded"),
        (AuthError("no key"), 401, "invalid_api_key"),
        (ModelForbidden("m"), 403, "model_not_allowed"),
        (RateLimited("requests", 2, 1.5, "key", []), 429, "rate_limit_exceeded"),
        (LimiterUnavailable("down"), 503, "service_unavailable"),
        (Overloaded("busy", retry_after=3), 503, "overloaded"),
        (asyncio.CancelledError(), 499, "client_closed_request"),
        (ClientDisconnect(), 499, "client_closed_request"),
        (RuntimeError("bug"), 500, None),
    ],
)
def test_status_of(exc: BaseException, status: int, code: str | None) -> None:
    assert status_of(exc) == (status, code)


def test_every_api_error_answers_with_its_status_body_and_retry_after() -> None:
    limited = api_error_response(RateLimited("tokens", 10, 1.2, "tenant", []))
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2" and limited.headers["retry-after-ms"] == "1200"
    assert json.loads(limited.body)["error"]["type"] == "tokens"
    forbidden = json.loads(api_error_response(ModelForbidden("secret-model")).body)["error"]
    assert forbidden == {
        "message": "This API key may not use the model 'secret-model'.",
        "type": "permission_error",
        "param": "model",
        "code": "model_not_allowed",
    }
    assert api_error_response(Overloaded("busy", retry_after=3)).headers["retry-after"] == "3"
