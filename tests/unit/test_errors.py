"""The one reading of an exception: the status and code a request ends with, and its body."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import ClientDisconnect

from backends.protocol import ContextLengthExceeded, Overloaded
from gateway.auth import AuthError, ModelForbidden
from gateway.errors import api_error_response, dialect_of, error_payload, status_of
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


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/v1/chat/completions", "openai"),
        ("/v1/embeddings", "openai"),
        ("/v1/responses", "openai"),
        ("/v1/messages", "anthropic"),
        ("/v1/messages/count_tokens", "anthropic"),
        ("/v1/messagesx", "openai"),
        ("/api/chat", "ollama"),
        ("/api/tags", "ollama"),
        ("/admin/reload", "openai"),
    ],
)
def test_the_url_names_the_dialect_of_its_errors(path: str, dialect: str) -> None:
    assert dialect_of(path) == dialect


def test_one_error_in_each_dialect_shape() -> None:
    exc = RateLimited("requests", 2, 1.5, "key", [])
    openai_body = json.loads(api_error_response(exc).body)
    assert openai_body["error"]["code"] == "rate_limit_exceeded" and openai_body["error"]["message"] == exc.message
    anthropic = api_error_response(exc, "anthropic")
    assert anthropic.status_code == 429 and anthropic.headers["retry-after"] == "2"
    assert json.loads(anthropic.body) == {"type": "error", "error": {"type": "rate_limit_error", "message": exc.message}}
    ollama = api_error_response(exc, "ollama")
    assert ollama.status_code == 429 and json.loads(ollama.body) == {"error": exc.message}
    # Anthropic's types by status, with a catch-all for each class of status.
    kinds = {status: error_payload("anthropic", status, "m")["error"]["type"] for status in (400, 401, 403, 404, 413, 422, 500, 502, 503)}
    assert kinds == {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
        413: "request_too_large", 422: "invalid_request_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
    }  # fmt: skip
