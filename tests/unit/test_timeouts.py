"""The route's deadlines: an attempt past first_token_s (a stream) or total_s (a whole
in-process answer) is an UpstreamTimeout, a 502 that retries and the circuit count as a
timeout, never a bare TimeoutError (which the app would answer with a 500)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backends.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    LoadReport,
    ModelCard,
    ResponseMessage,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.dispatch import Dispatcher
from gateway.errors import status_of
from gateway.generate import _answer, _open_stream
from gateway.tracing import Tracing
from policies.retry import Outcome, classify
from policies.routing import RequestFeatures
from policies.schema import parse_config

REQUEST = ChatCompletionRequest(model="chat", messages=[{"role": "user", "content": "hi"}])


class Stuck:
    """A backend that takes every request and never answers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> list[ModelCard]:
        return [ModelCard(id="chat")]

    def load(self) -> LoadReport:
        return LoadReport()

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[Any]:
        self.calls += 1
        await asyncio.Event().wait()
        yield None  # pragma: no cover

    async def completion(self, request: Any) -> Any:
        raise NotImplementedError

    def completion_stream(self, request: Any) -> Any:
        raise NotImplementedError


class Answers(Stuck):
    """A backend that answers at once."""

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        self.calls += 1
        return ChatCompletion(model=request.model, choices=[ChatChoice(message=ResponseMessage(content="ok"), finish_reason="stop")])


def dispatcher(*backends: Stuck, retries: int = 0, first_token_s: float = 0.3, total_s: float = 0.6) -> Dispatcher:
    entries = "".join(f"  - {{name: {b.name}, kind: remote, model: m, url: 'http://127.0.0.1:9', metrics_url: none}}\n" for b in backends)
    pool = ", ".join(b.name for b in backends)
    config = parse_config(
        f"backends:\n{entries}"
        f"routes:\n  - {{model: chat, backends: [{pool}], strategy: round_robin, retries: {{max_retries: {retries}, backoff_base_s: 0}},"
        f" timeouts: {{first_token_s: {first_token_s}, total_s: {total_s}}}}}\n"
        "circuit: {failures: 1}\n"
    )
    return Dispatcher(config, {b.name: b for b in backends})


async def test_a_whole_answer_past_total_s_is_an_upstream_timeout() -> None:
    d = dispatcher(Stuck("stuck"))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await _answer("chat", d, d.backends["stuck"], d.route("chat"), REQUEST, b"", Tracing(), None)
    assert 0.55 <= time.monotonic() - started < 3
    err = info.value
    assert isinstance(err, UpstreamError) and err.failure == "timeout" and "timeouts.total_s" in err.message
    assert classify(err) is Outcome.TIMEOUT
    assert status_of(err) == (502, "upstream_error") and err.body()["error"]["type"] == "server_error"


async def test_a_stream_with_no_first_chunk_by_first_token_s_is_an_upstream_timeout() -> None:
    d = dispatcher(Stuck("stuck"), first_token_s=0.3, total_s=30)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await _open_stream("chat", d, d.backends["stuck"], d.route("chat"), REQUEST, b"", Tracing(), None)
    assert 0.25 <= time.monotonic() - started < 3  # the first-token deadline, far before the total
    assert "timeouts.first_token_s (0.3 s)" in info.value.message and classify(info.value) is Outcome.TIMEOUT


async def test_a_timeout_is_retried_elsewhere_and_opens_the_circuit() -> None:
    stuck, good = Stuck("stuck"), Answers("good")
    d = dispatcher(stuck, good, retries=1)
    lease, (result, _) = await d.call(
        "chat", lambda b, r: _answer("chat", d, b, r, REQUEST, b"", Tracing(), None), RequestFeatures(model="chat")
    )
    lease.release()
    assert (stuck.calls, good.calls, lease.name) == (1, 1, "good") and result.choices[0].message.content == "ok"
    assert not d.board.available("stuck", d.clock())  # failures: 1, so one timeout ejects it
    assert d.board.available("good", d.clock())


async def test_without_retries_the_client_gets_the_timeout_itself() -> None:
    d = dispatcher(Stuck("stuck"))
    with pytest.raises(UpstreamTimeout):
        await d.call("chat", lambda b, r: _answer("chat", d, b, r, REQUEST, b"", Tracing(), None), RequestFeatures(model="chat"))
