"""Hostile input and stalled backends against a real `turnout serve` (issue 17, items 2, 3, 4
and the small ones of 8): remote backends on loopback, a scripted upstream that records what
reached it, and a socket that accepts connections and never answers.

- A lone UTF-16 surrogate is a 400 naming the field, and no backend sees the request.
- A backend that never answers is a 502 `upstream_error` at the route's `first_token_s`
  (streamed or not), retried elsewhere, counted by the circuit, and never an unhandled error.
- max_tokens has a ceiling (the route's, else the upstream's context length); negative
  token ids are refused.
- Error messages and locations: an empty body, a long `stop`, a null user `content`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, asgi_in_thread, read_body, start_server

pytestmark = pytest.mark.slow

CONTEXT = 2048  # what the scripted upstream's /v1/models reports


class SilentServer:
    """Accepts every connection and never answers (the kernel buffers what is sent)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self._connections.append(conn)  # held open, never read or written
            self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._connections:
            conn.close()
        self.sock.close()


class Upstream:
    """An OpenAI-shaped upstream recording each generation request. /v1/models reports
    `max_model_len` except under the `/bare` prefix (an upstream that does not say)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        raw = await read_body(receive)
        path = scope["path"]
        if scope["method"] == "GET" and path.endswith("/v1/models"):
            card: dict[str, Any] = {"id": "up-model", "object": "model", "created": 0, "owned_by": "test"}
            if not path.startswith("/bare"):
                card["max_model_len"] = CONTEXT
            body: dict[str, Any] = {"object": "list", "data": [card]}
        else:
            self.requests.append(json.loads(raw))
            body = {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }  # fmt: skip
            if path.endswith("/completions") and not path.endswith("/chat/completions"):
                body = {**body, "object": "text_completion", "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Upstream]]:
    app = Upstream()
    with asgi_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


STALL = {"retries": {"max_retries": 0}, "timeouts": {"first_token_s": 1, "total_s": 20}}


@pytest.fixture(scope="module")
def gateway(upstream: tuple[str, Upstream], silent: SilentServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    url = upstream[0]

    def remote(name: str, served: str, at: str) -> dict[str, Any]:
        return {"name": name, "kind": "remote", "model": "up-model", "served_name": served, "url": at, "metrics_url": "none"}

    config = {
        "server": {"host": "127.0.0.1"},
        "circuit": {"failures": 1, "window_s": 60, "cooldown_s": 60},  # one failure ejects: visible at once
        "backends": [
            remote("up", "chat", url),
            remote("bare", "bare", url + "/bare/v1"),
            remote("capped-up", "capped-up", url),
            remote("silent-a", "silent-a", silent.url),
            remote("silent-b", "silent-b", silent.url),
            remote("silent-c", "silent-c", silent.url),
            remote("up-c", "up-c", url),
        ],
        "routes": [
            {"model": "capped", "backends": ["capped-up"], "max_tokens": 100},
            {"model": "stall", "backends": ["silent-a"], **STALL},
            {"model": "stall-stream", "backends": ["silent-b"], **STALL},
            {
                "model": "failover",
                "backends": ["silent-c", "up-c"],
                "strategy": "round_robin",  # equal weights: the first in the pool goes first
                "retries": {"max_retries": 1, "backoff_base_s": 0},
                "timeouts": {"first_token_s": 1, "total_s": 20},
            },
        ],
    }
    server = start_server(config, tmp_path_factory.mktemp("faults"))
    yield server
    server.stop()


def post(server: Server, path: str, body: dict | bytes, timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, headers={"content-type": "application/json"}, timeout=timeout)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def available(server: Server, backend: str) -> float:
    page = httpx.get(server.url + "/metrics", timeout=10).text
    family = next(f for f in text_string_to_metric_families(page) if f.name == "turnout:backend_available")
    return next(s.value for s in family.samples if s.labels["backend"] == backend)


# -- item 2: lone surrogates ----------------------------------------------------------------------

# JSON escapes as a client sends them: json.dumps would write the same.
SURROGATE_BODIES = [
    ("/chat/completions", b'{"model":"chat","messages":[{"role":"user","content":"hi \\ud800"}]}', "messages.0.content"),
    ("/chat/completions", b'{"model":"chat","messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]}', "messages.0.content.0.text"),
    ("/chat/completions", b'{"model":"chat","messages":[{"role":"user","content":"hi","name":"\\ud83d"}]}', "messages.0.name"),
    ("/chat/completions", b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"stop":["ok","\\ud800"]}', "stop.1"),
    ("/chat/completions", b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"user":"\\ud800"}', "user"),
    ("/chat/completions", b'{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}', "model"),
    ("/completions", b'{"model":"chat","prompt":"\\ud800"}', "prompt"),
    ("/completions", b'{"model":"chat","prompt":["\\ud800"]}', "prompt.0"),
    # A field the gateway does not model, forwarded as sent: the remote backend refuses it.
    ("/chat/completions", b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"\\ud800"}}]}', "tools.0.function.name"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATE_BODIES, ids=[p for _, _, p in SURROGATE_BODIES])
def test_a_lone_surrogate_is_a_400_naming_the_field(gateway: Server, upstream: tuple[str, Upstream], path: str, raw: bytes, param: str) -> None:
    seen = len(upstream[1].requests)
    err = error_of(post(gateway, path, raw), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "surrogate" in err["message"] or "unicode" in err["message"]  # pydantic's own check for a constrained str
    assert len(upstream[1].requests) == seen  # no backend saw it
    assert "UnicodeEncodeError" not in gateway.log.read_text()


def test_valid_non_ascii_text_still_passes(gateway: Server, upstream: tuple[str, Upstream]) -> None:
    raw = '{"model":"chat","messages":[{"role":"user","content":"héllo \\ud83d\\ude00 ✓"}]}'.encode()
    assert post(gateway, "/chat/completions", raw).status_code == 200
    assert upstream[1].requests[-1]["messages"][0]["content"] == "héllo 😀 ✓"


# -- item 3: a backend that accepts and never answers --------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_silent_backend_is_a_502_at_first_token_s(gateway: Server, silent: SilentServer, stream: bool) -> None:
    model, backend = ("stall-stream", "silent-b") if stream else ("stall", "silent-a")
    before = silent.accepted
    started = time.monotonic()
    response = post(gateway, "/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    elapsed = time.monotonic() - started
    err = error_of(response, 502)  # before any byte: an ordinary HTTP error, streamed or not
    assert err["code"] == "upstream_error" and err["type"] == "server_error"
    assert "timed out (first byte)" in err["message"] or "timeouts.first_token_s (1 s)" in err["message"]
    assert 0.99 <= elapsed < 10, elapsed  # first_token_s is 1, total_s 20
    assert silent.accepted > before  # the request did reach it
    assert available(gateway, backend) == 0.0  # the circuit counted it (failures: 1)
    assert "unhandled error" not in gateway.log.read_text()


def test_a_silent_backend_is_retried_on_the_next_one(gateway: Server) -> None:
    started = time.monotonic()
    response = post(gateway, "/chat/completions", {"model": "failover", "messages": [{"role": "user", "content": "hi"}]})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hi"
    assert 0.99 <= elapsed < 10  # the silent one was tried first and given up at first_token_s
    assert available(gateway, "silent-c") == 0.0 and available(gateway, "up-c") == 1.0
    # Ejected: the next request goes straight to the one that answers.
    started = time.monotonic()
    assert post(gateway, "/chat/completions", {"model": "failover", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert time.monotonic() - started < 0.9


# -- item 4: a ceiling on max_tokens; token ids -----------------------------------------------------


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


def test_max_tokens_over_the_upstream_context_length_is_a_400(gateway: Server, upstream: tuple[str, Upstream]) -> None:
    seen = len(upstream[1].requests)
    for field in ("max_tokens", "max_completion_tokens"):
        err = error_of(post(gateway, "/chat/completions", chat("chat", **{field: 193577024})), 400)
        assert err["param"] == field and err["code"] == "context_length_exceeded"
        assert str(CONTEXT) in err["message"] and "193577024" in err["message"]
    err = error_of(post(gateway, "/completions", {"model": "chat", "prompt": "hi", "max_tokens": CONTEXT + 1}), 400)
    assert err["param"] == "max_tokens"
    assert len(upstream[1].requests) == seen  # refused before dispatch
    assert post(gateway, "/chat/completions", chat("chat", max_tokens=CONTEXT)).status_code == 200
    assert upstream[1].requests[-1]["max_tokens"] == CONTEXT


def test_the_gateway_reports_the_upstream_context_length(gateway: Server) -> None:
    cards = {c["id"]: c for c in httpx.get(gateway.base_url + "/models", timeout=10).json()["data"]}
    assert cards["chat"]["max_model_len"] == CONTEXT
    assert cards["bare"]["max_model_len"] is None  # its /v1/models does not say


def test_a_route_max_tokens_is_its_ceiling(gateway: Server, upstream: tuple[str, Upstream]) -> None:
    seen = len(upstream[1].requests)
    err = error_of(post(gateway, "/chat/completions", chat("capped", max_tokens=101)), 400)
    assert err["param"] == "max_tokens" and err["code"] == "invalid_value" and "at most 100" in err["message"]
    err = error_of(post(gateway, "/chat/completions", chat("capped", max_completion_tokens=101)), 400)
    assert err["param"] == "max_completion_tokens"
    assert len(upstream[1].requests) == seen
    assert post(gateway, "/chat/completions", chat("capped", max_tokens=100)).status_code == 200


def test_without_a_known_context_length_max_tokens_is_forwarded(gateway: Server, upstream: tuple[str, Upstream]) -> None:
    assert post(gateway, "/chat/completions", chat("bare", max_tokens=100_000)).status_code == 200
    assert upstream[1].requests[-1]["max_tokens"] == 100_000  # the upstream's own check applies


@pytest.mark.parametrize(("prompt", "param"), [([5, -1], "prompt.1"), ([[3, -2]], "prompt.0.1")])
def test_negative_token_ids_are_refused(gateway: Server, upstream: tuple[str, Upstream], prompt: list, param: str) -> None:
    seen = len(upstream[1].requests)
    err = error_of(post(gateway, "/completions", {"model": "chat", "prompt": prompt}), 400)
    assert err["param"] == param and "greater than or equal to 0" in err["message"]
    err = error_of(post(gateway, "/completions", {"model": "chat", "prompt": "hi", "logit_bias": {"-3": 1}}), 400)
    assert err["param"] == "logit_bias"
    assert len(upstream[1].requests) == seen


# -- item 8: messages and locations ------------------------------------------------------------------


def test_an_empty_body_says_so(gateway: Server) -> None:
    err = error_of(post(gateway, "/chat/completions", b""), 400)
    assert err["param"] is None and "'None'" not in err["message"]
    assert "body is empty" in err["message"]


def test_a_long_stop_list_is_located_at_stop(gateway: Server) -> None:
    err = error_of(post(gateway, "/chat/completions", chat("chat", stop=["a", "b", "c", "d", "e"])), 400)
    assert err["param"] == "stop" and "at most 4" in err["message"]
    err = error_of(post(gateway, "/chat/completions", chat("chat", stop=5)), 400)
    assert err["param"] == "stop"
    err = error_of(post(gateway, "/chat/completions", chat("chat", stop=["a", 5])), 400)
    assert err["param"] == "stop.1" and "valid string" in err["message"]


@pytest.mark.parametrize("role", ["user", "system", "developer", "tool"])
def test_content_is_required_except_from_the_assistant(gateway: Server, upstream: tuple[str, Upstream], role: str) -> None:
    seen = len(upstream[1].requests)
    for message in ({"role": role, "content": None}, {"role": role}):
        err = error_of(post(gateway, "/chat/completions", {"model": "chat", "messages": [message]}), 400)
        assert err["param"] == "messages.0.content" and "content is required" in err["message"]
    assert len(upstream[1].requests) == seen
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "and?"}]
    assert post(gateway, "/chat/completions", {"model": "chat", "messages": history}).status_code == 200


# -- item 2 on the llama.cpp path ------------------------------------------------------------------


def test_a_lone_surrogate_never_reaches_llama_cpp(llamacpp_server: Server) -> None:
    for path, raw, param in SURROGATE_BODIES[:-1]:  # not `tools`: llama.cpp is not sent fields it does not model
        raw = raw.replace(b'"model":"chat"', b'"model":"smollm2-135m"')
        assert error_of(post(llamacpp_server, path, raw, timeout=60), 400)["param"] == param
    assert "UnicodeEncodeError" not in llamacpp_server.log.read_text()
