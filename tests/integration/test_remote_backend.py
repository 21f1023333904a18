"""RemoteBackend against real servers on loopback: a `turnout serve` llama.cpp node (slow),
and a small scripted OpenAI-shaped server for the failures a healthy node will not produce
(5xx, bad JSON, stalls, load headers)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.protocol import (
    BackendError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    InvalidRequest,
    LoadReport,
    Overloaded,
    StreamOptions,
    UpstreamError,
)
from backends.remote.openai_http import MODELS_TIMEOUT_S, RemoteBackend
from backends.remote.upstream_errors import RemoteFailure, UpstreamClientError
from policies.retry import Outcome, classify
from tests.conftest import Server, asgi_in_thread, free_port, llamacpp_config, read_body, start_server
from tests.integration.test_faults_input import SilentServer

MODEL = "smollm2-135m"
HELLO = [ChatMessage(role="user", content="Name three colours.")]


def chat_request(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="alias", messages=HELLO, **kw)


# ---------------------------------------------------------------------------------------------
# A scripted upstream: behaviour chosen by the (rewritten) model name in the body.
# ---------------------------------------------------------------------------------------------

LOAD = LoadReport(kv_usage=0.25, kv_free_blocks=300, block_size=16, running=3, waiting=1, max_running=8)


def _chunk(text: str | None, finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "upstream",
        "choices": [{"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class ScriptedUpstream:
    """A raw ASGI app; records every request it got."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if scope["method"] == "GET":  # /v1/models: a context length for "ok" alone
            models = {"object": "list", "data": [{"id": "ok", "object": "model", "max_model_len": 4096}, {"id": "other", "object": "model"}]}
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(models).encode()})
            return
        body = json.loads(raw)
        self.requests.append((scope["path"], headers, body))
        mode = body["model"]

        async def answer(status: int, payload: bytes, extra: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), *extra]})
            await send({"type": "http.response.body", "body": payload})

        if mode == "ok":
            completion = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": "upstream-name",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
            await answer(200, json.dumps(completion).encode(), [(b"endpoint-load-metrics", LOAD.to_header().encode())])
        elif mode == "boom":
            await answer(500, json.dumps({"error": {"message": "kaput", "type": "server_error"}}).encode())
        elif mode == "busy":
            await answer(503, json.dumps({"error": {"message": "at capacity", "type": "server_error"}}).encode(), [(b"retry-after", b"7")])
        elif mode == "unauth":
            await answer(401, json.dumps({"error": {"message": "bad key", "type": "authentication_error"}}).encode())
        elif mode == "ollama-404":
            await answer(404, json.dumps({"error": "model 'x' not found"}).encode())
        elif mode == "badjson":
            await answer(200, b"<html>surprise</html>")
        elif mode in ("slow-first", "midfail", "truncated", "pings"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            if mode == "slow-first":
                await asyncio.sleep(3)
            if mode == "pings":
                await send({"type": "http.response.body", "body": b": ping\n\nevent: message\n", "more_body": True})
            await send({"type": "http.response.body", "body": _chunk("one"), "more_body": True})
            if mode == "midfail":
                err = {"error": {"message": "engine died", "type": "server_error"}}
                await send({"type": "http.response.body", "body": b"data: " + json.dumps(err).encode() + b"\n\n", "more_body": True})
            if mode == "pings":
                await send({"type": "http.response.body", "body": _chunk(None, "stop") + b"data: [DONE]\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await answer(400, b"{}")


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, ScriptedUpstream]]:
    app = ScriptedUpstream()
    with asgi_in_thread(app) as url:
        yield url, app


def remote(url: str, model: str, **kw: Any) -> RemoteBackend:
    return RemoteBackend("up", model, url=url, model_id="alias", **kw)


async def test_forwards_raw_body_with_model_rewritten_and_key(scripted: tuple[str, ScriptedUpstream], monkeypatch: pytest.MonkeyPatch) -> None:
    url, app = scripted
    monkeypatch.setenv("TURNOUT_TEST_KEY", "sk-upstream")
    backend = remote(url, "ok", api_key_env="TURNOUT_TEST_KEY")
    await backend.start()
    try:
        request = chat_request(max_tokens=9)
        # The client's body as sent, with a field the gateway does not model.
        raw = json.dumps({"model": "alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "tools": [{"type": "function"}]}).encode()
        out = await backend.chat_raw(request, raw)
    finally:
        await backend.close()
    path, headers, body = app.requests[-1]
    assert path == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-upstream"
    assert body == {"model": "ok", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "tools": [{"type": "function"}]}
    # Nothing else was touched: no `stream` key added where the client sent none.
    assert out.model == "alias" and out.choices[0].message.content == "hi"
    # The load header piggybacked on the answer is what load() reports now.
    report = backend.load()
    assert (report.kv_usage, report.kv_free_blocks, report.running, report.waiting, report.max_running) == (0.25, 300, 3, 1, 8)
    assert report.healthy


async def test_without_raw_body_sends_only_fields_set(scripted: tuple[str, ScriptedUpstream]) -> None:
    url, app = scripted
    backend = remote(url, "ok")
    try:
        await backend.chat(chat_request(temperature=0.0))
    finally:
        await backend.close()
    _, headers, body = app.requests[-1]
    assert "authorization" not in headers
    assert body == {"model": "ok", "messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0.0}


async def test_stream_flag_is_made_to_match_the_call(scripted: tuple[str, ScriptedUpstream]) -> None:
    url, app = scripted
    backend = remote(url, "ok")
    request = chat_request(stream=True)
    raw = b'{"model":"alias","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}'
    try:
        await backend.chat_raw(request, raw)  # the non-streamed call: the upstream must not stream
    finally:
        await backend.close()
    assert app.requests[-1][2] == {"model": "ok", "messages": [{"role": "user", "content": "hi"}], "stream": False}


async def test_usage_turned_on_in_the_parsed_request_reaches_the_upstream(scripted: tuple[str, ScriptedUpstream]) -> None:
    url, app = scripted
    backend = remote(url, "pings")
    request = chat_request(stream=True)
    raw = b'{"model":"alias","messages":[{"role":"user","content":"hi"}],"stream":true}'
    # What gateway.ratelimit does to reconcile token limits with the upstream's usage chunk.
    request.stream_options = StreamOptions(include_usage=True)
    try:
        [c async for c in backend.chat_stream_raw(request, raw)]
    finally:
        await backend.close()
    assert app.requests[-1][2] == {"model": "pings", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}


async def test_start_learns_the_context_length_from_v1_models(scripted: tuple[str, ScriptedUpstream]) -> None:
    known, unknown = remote(scripted[0], "ok"), remote(scripted[0], "boom")
    gone = RemoteBackend("gone", MODEL, url=f"http://127.0.0.1:{free_port()}", model_id="alias")
    try:
        for backend in (known, unknown, gone):
            await backend.start()  # an upstream that does not say, or is down, still starts
    finally:
        for backend in (known, unknown, gone):
            await backend.close()
    assert known.models()[0].max_model_len == 4096 and known.models()[0].id == "alias"
    assert unknown.models()[0].max_model_len is None  # two models listed, none of them "boom"
    assert gone.models()[0].max_model_len is None


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


async def test_an_upstream_that_never_answers_fails_at_the_first_byte_deadline(silent: SilentServer) -> None:
    backend = RemoteBackend("mute", "m", url=silent.url, model_id="alias")
    short = RemoteBackend("short", "m", url=silent.url, total_timeout_s=0.3)
    started = time.monotonic()
    await backend.start()  # /v1/models unanswered: bounded, and the context length unknown
    assert time.monotonic() - started < MODELS_TIMEOUT_S + 1 and backend.models()[0].max_model_len is None
    started = time.monotonic()
    try:
        with pytest.raises(RemoteFailure) as info:
            await backend.chat_raw(chat_request(), None, first_byte_timeout_s=0.5)
        elapsed = time.monotonic() - started
        with pytest.raises(RemoteFailure) as whole:  # without it: the backend's own total deadline
            await short.chat(chat_request())
    finally:
        await backend.close()
        await short.close()
    assert 0.45 <= elapsed < 3 and info.value.failure == "timeout" and "first byte" in info.value.message
    assert classify(info.value) is Outcome.TIMEOUT and info.value.status == 502
    assert whole.value.failure == "timeout" and "total" in whole.value.message
    assert backend.in_flight == 0 and silent.accepted >= 3


async def test_a_lone_surrogate_in_a_field_not_modelled_is_refused_unsent(scripted: tuple[str, ScriptedUpstream]) -> None:
    url, app = scripted
    backend = remote(url, "ok")
    raw = b'{"model":"alias","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f\\ud800"}}]}'
    seen = len(app.requests)
    try:
        with pytest.raises(InvalidRequest) as info:
            await backend.chat_raw(chat_request(), raw)
        with pytest.raises(InvalidRequest):
            backend.chat_stream_raw(chat_request(stream=True), raw)
    finally:
        await backend.close()
    assert info.value.status == 400 and info.value.param == "tools.0.function.name" and "surrogate" in info.value.message
    assert len(app.requests) == seen


def test_missing_api_key_env_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TURNOUT_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="TURNOUT_NO_SUCH_KEY"):
        RemoteBackend("up", "m", url="http://127.0.0.1:1", api_key_env="TURNOUT_NO_SUCH_KEY")


@pytest.mark.parametrize(
    ("mode", "failure", "upstream_status"),
    [("boom", "server", 500), ("badjson", "protocol", None), ("unauth", "server", 401)],
)
async def test_upstream_failures_are_502(scripted: tuple[str, ScriptedUpstream], mode: str, failure: str, upstream_status: int | None) -> None:
    backend = remote(scripted[0], mode)
    try:
        with pytest.raises(RemoteFailure) as info:
            await backend.chat(chat_request())
    finally:
        await backend.close()
    assert info.value.status == 502 and isinstance(info.value, UpstreamError)
    assert info.value.failure == failure and info.value.upstream_status == upstream_status
    assert info.value.body()["error"]["code"] == "upstream_error"
    assert classify(info.value) is Outcome.SERVER_ERROR


async def test_upstream_503_stays_503_with_retry_after(scripted: tuple[str, ScriptedUpstream]) -> None:
    backend = remote(scripted[0], "busy")
    try:
        with pytest.raises(Overloaded) as info:
            await backend.chat(chat_request())
    finally:
        await backend.close()
    assert info.value.status == 503 and info.value.retry_after == 7.0 and info.value.message == "at capacity"
    assert classify(info.value) is Outcome.OVERLOADED


async def test_non_openai_4xx_body_passes_through(scripted: tuple[str, ScriptedUpstream]) -> None:
    backend = remote(scripted[0], "ollama-404")
    try:
        with pytest.raises(UpstreamClientError) as info:
            await backend.chat(chat_request())
    finally:
        await backend.close()
    assert info.value.status == 404 and info.value.message == "model 'x' not found"
    assert info.value.body()["error"]["type"] == "invalid_request_error"


async def test_first_token_timeout(scripted: tuple[str, ScriptedUpstream]) -> None:
    backend = remote(scripted[0], "slow-first", first_token_timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(RemoteFailure) as info:
            async for _ in backend.chat_stream(chat_request(stream=True)):
                pass
    finally:
        await backend.close()
    assert info.value.failure == "timeout" and "first token" in info.value.message
    assert 0.4 < time.monotonic() - started < 2.5
    assert classify(info.value) is Outcome.TIMEOUT
    assert backend.in_flight == 0


async def test_total_timeout_for_non_streamed(scripted: tuple[str, ScriptedUpstream]) -> None:
    backend = remote(scripted[0], "slow-first", total_timeout_s=0.5)
    try:
        with pytest.raises(RemoteFailure) as info:
            await backend.chat(chat_request())
    finally:
        await backend.close()
    assert info.value.failure == "timeout"


async def test_stream_skips_comments_and_events(scripted: tuple[str, ScriptedUpstream]) -> None:
    backend = remote(scripted[0], "pings")
    try:
        chunks = [c async for c in backend.chat_stream(chat_request(stream=True))]
    finally:
        await backend.close()
    assert [c.choices[0].delta.content for c in chunks] == ["one", None]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.model == "alias" for c in chunks)
    assert scripted[1].requests[-1][2]["stream"] is True


@pytest.mark.parametrize(("mode", "words"), [("midfail", "engine died"), ("truncated", "without [DONE]")])
async def test_stream_failures_after_first_chunk(scripted: tuple[str, ScriptedUpstream], mode: str, words: str) -> None:
    backend = remote(scripted[0], mode)
    got: list[str | None] = []
    try:
        with pytest.raises(RemoteFailure) as info:
            async for chunk in backend.chat_stream(chat_request(stream=True)):
                got.append(chunk.choices[0].delta.content)
    finally:
        await backend.close()
    assert got == ["one"]
    assert words in info.value.message and info.value.status == 502


async def test_closed_port_is_502_connect() -> None:
    backend = RemoteBackend("gone", MODEL, url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=2)
    assert backend.load().healthy
    try:
        with pytest.raises(RemoteFailure) as info:
            await backend.chat(chat_request())
        assert info.value.status == 502 and info.value.failure == "connect"
        assert classify(info.value) is Outcome.CONNECT_ERROR
        # Ejection is the circuit breaker's job (it also probes for recovery), not the backend's.
        assert backend.load().healthy
        with pytest.raises(RemoteFailure) as stream_info:
            await anext(backend.completion_stream(CompletionRequest(model="alias", prompt="x", stream=True)))
        assert stream_info.value.failure == "connect"
    finally:
        await backend.close()
    assert backend.in_flight == 0


# ---------------------------------------------------------------------------------------------
# A real `turnout serve` llama.cpp node
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def node(llamacpp_server: Server) -> Any:
    backend = RemoteBackend("node", MODEL, url=llamacpp_server.url, model_id="alias")
    await backend.start()
    yield backend
    await backend.close()


def direct(server: Server, path: str, body: dict) -> dict:
    r = httpx.post(server.base_url + path, json=body, timeout=60)
    r.raise_for_status()
    return r.json()


@pytest.mark.slow
async def test_chat_through_remote_matches_direct(node: RemoteBackend, llamacpp_server: Server) -> None:
    out = await node.chat(chat_request(max_tokens=16, temperature=0))
    want = direct(llamacpp_server, "/chat/completions", {"model": MODEL, "messages": [m.model_dump() for m in HELLO], "max_tokens": 16, "temperature": 0})
    assert out.model == "alias"
    assert out.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert out.usage is not None and out.usage.model_dump() == want["usage"]
    # The node piggybacks its LoadReport on every answer (one instance: max_running 1; the
    # fallback before any header would say max_connections).
    report = node.load()
    assert report.healthy and report.max_running == 1 and report.running == 0
    assert node.models()[0].max_model_len == 512  # the node's /v1/models: its n_ctx


@pytest.mark.slow
async def test_raw_body_wins_over_parsed_fields(node: RemoteBackend) -> None:
    request = chat_request(max_tokens=30, temperature=0)
    # What the client sent says 3 tokens: that is what the upstream must see.
    raw = json.dumps({"model": "alias", "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 3, "temperature": 0, "ignore_eos": True}).encode()
    out = await node.chat_raw(request, raw)
    assert out.usage is not None and out.usage.completion_tokens == 3
    assert out.choices[0].finish_reason == "length"


@pytest.mark.slow
async def test_chat_stream_through_remote(node: RemoteBackend) -> None:
    full = await node.chat(chat_request(max_tokens=16, temperature=0))
    request = chat_request(max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in node.chat_stream(request)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert all(c.model == "alias" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    assert node.in_flight == 0


@pytest.mark.slow
async def test_completions_through_remote(node: RemoteBackend, llamacpp_server: Server) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    want = direct(llamacpp_server, "/completions", body)
    out = await node.completion(CompletionRequest(model="alias", prompt="The capital of France is", max_tokens=8, temperature=0))
    assert out.object == "text_completion" and out.model == "alias"
    assert out.choices[0].text == want["choices"][0]["text"]
    streamed = [c async for c in node.completion_stream(CompletionRequest(model="alias", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want["choices"][0]["text"]
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
async def test_upstream_4xx_passes_through(node: RemoteBackend) -> None:
    with pytest.raises(UpstreamClientError) as info:
        await node.chat(chat_request(max_tokens=100_000))
    err = info.value
    assert isinstance(err, InvalidRequest) and isinstance(err, BackendError)
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.code == "context_length_exceeded" and err.param == "max_tokens"
    assert "maximum context length" in err.message
    assert classify(err) is Outcome.CLIENT_ERROR
    # Streamed: the same error before the first chunk, so the gateway can still answer 400.
    with pytest.raises(UpstreamClientError) as stream_info:
        await anext(node.chat_stream(chat_request(max_tokens=100_000, stream=True)))
    assert stream_info.value.status == 400 and stream_info.value.code == "context_length_exceeded"


@pytest.fixture(scope="module")
def busy_node(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One instance and no wait queue: a second request while one runs gets 503 at once."""
    server = start_server(llamacpp_config(model_path, instances=1, max_queue=0, n_ctx=2048), tmp_path_factory.mktemp("busy"))
    yield server
    server.stop()


@pytest.mark.slow
async def test_closing_stream_early_cancels_upstream_generation(busy_node: Server) -> None:
    backend = RemoteBackend("node", MODEL, url=busy_node.url, model_id="alias")
    probe = RemoteBackend("probe", MODEL, url=busy_node.url, model_id="alias")
    tiny = chat_request(max_tokens=1)
    try:
        # ~2000 tokens take many seconds on a CPU: long enough to see whether it stops.
        stream = backend.chat_stream(chat_request(max_tokens=2000, ignore_eos=True, stream=True))
        for _ in range(3):
            await anext(stream)
        # The only instance is busy generating: the node sheds a second request.
        with pytest.raises(Overloaded):
            await probe.chat(tiny)
        assert backend.in_flight == 1
        await stream.aclose()  # type: ignore[attr-defined]
        assert backend.in_flight == 0
        closed_at = time.monotonic()
        # The upstream saw the disconnect and freed its instance: a request is served soon.
        # It notices at its next token (and the worker at the one after), which on a busy
        # 2-core box can take a second; the rest of 2000 tokens would take far longer than 5s.
        while True:
            try:
                out = await probe.chat(tiny)
                break
            except Overloaded:
                assert time.monotonic() - closed_at < 5.0, "the upstream kept generating after the stream was closed"
                await asyncio.sleep(0.05)
        assert out.usage is not None and out.usage.completion_tokens == 1
    finally:
        await backend.close()
        await probe.close()


@pytest.mark.slow
async def test_cancelling_a_non_streamed_call_cancels_upstream_generation(busy_node: Server) -> None:
    backend = RemoteBackend("node", MODEL, url=busy_node.url, model_id="alias")
    probe = RemoteBackend("probe", MODEL, url=busy_node.url, model_id="alias")
    tiny = chat_request(max_tokens=1)
    try:
        # What the gateway does when a client leaves while waiting for a whole answer.
        task = asyncio.create_task(backend.chat(chat_request(max_tokens=2000, ignore_eos=True)))
        # Give it time to be admitted (probing earlier would race it for the one instance).
        await asyncio.sleep(1.0)
        assert not task.done(), task.exception() if task.done() else None
        with pytest.raises(Overloaded):  # the node is busy with it
            await probe.chat(tiny)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert backend.in_flight == 0
        cancelled_at = time.monotonic()
        while True:
            try:
                await probe.chat(tiny)
                break
            except Overloaded:
                assert time.monotonic() - cancelled_at < 5.0, "the upstream kept generating after the call was cancelled"
                await asyncio.sleep(0.05)
    finally:
        await backend.close()
        await probe.close()
