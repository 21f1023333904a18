"""What crosses the engine worker's pipe: messages round-trip through msgpack, errors come back
as the exceptions the gateway maps to OpenAI bodies, and a request's queued-up deltas merge."""

from __future__ import annotations

import pytest

from backends.generation import GenerationDelta, TokenLogprob
from backends.protocol import BackendError, ContextLengthExceeded, InvalidRequest, ModelNotFound, Overloaded
from backends.worker import messages as m
from backends.process_exit import exit_reason
from backends.worker.pipe import RequestStream, WorkerDied, error_from


def test_messages_round_trip_in_one_batch() -> None:
    batch = [
        m.Started("r1", 12, ""),
        m.Delta("r1", GenerationDelta("hi", [5, 6], None, [TokenLogprob(5, "h", -0.1, [("x", -2.0)])])),
        m.Failed("r2", 400, "invalid_request_error", "bad", "context_length_exceeded", "max_tokens"),
        m.Load(0.5, 10, 16, 2, 1, 8, 0.25, True, 1 << 20, {"vllm:generation_tokens": 7.0}),
    ]
    assert m.from_worker_decoder.decode(m.from_worker_encoder.encode(batch)) == batch
    commands = [m.Submit("r1", "chat", b'{"model": "x"}'), m.Abort("r1"), m.Shutdown()]
    assert m.to_worker_decoder.decode(m.to_worker_encoder.encode(commands)) == commands


@pytest.mark.parametrize(
    ("failed", "cls", "status"),
    [
        (m.Failed("r", 400, "invalid_request_error", "too long", "context_length_exceeded", "messages"), ContextLengthExceeded, 400),
        (m.Failed("r", 400, "invalid_request_error", "bad bias", None, "logit_bias"), InvalidRequest, 400),
        (m.Failed("r", 404, "invalid_request_error", "no model", "model_not_found"), ModelNotFound, 404),
        (m.Failed("r", 503, "server_error", "full", "overloaded", None, 7.5), Overloaded, 503),
        (m.Failed("r", 500, "server_error", "boom"), BackendError, 500),
    ],
)  # fmt: skip
def test_errors_come_back_as_their_exceptions(failed: m.Failed, cls: type, status: int) -> None:
    exc = error_from(failed)
    assert type(exc) is cls and exc.status == status and exc.message == failed.message and exc.param == failed.param
    assert exc.body()["error"]["type"] == failed.type
    if isinstance(exc, Overloaded):
        assert exc.retry_after == 7.5


def test_exit_reasons() -> None:
    assert exit_reason(-9) == "SIGKILL" and exit_reason(-4) == "SIGILL" and exit_reason(3) == "exit code 3"


class FakeWorker:
    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.forgotten: list[str] = []

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)

    def forget(self, rid: str) -> None:
        self.forgotten.append(rid)


async def test_queued_deltas_merge_and_the_stream_ends_once() -> None:
    worker, ended = FakeWorker(), []
    stream = RequestStream(worker, "r", lambda: ended.append(1))  # type: ignore[arg-type]
    stream.put(m.Started("r", 3))
    await stream.started()
    for i, text in enumerate(["a", "b", "c"]):
        stream.put(GenerationDelta(text, [i]))
    first = await anext(stream)
    assert (first.text, first.token_ids, first.finish_reason) == ("abc", [0, 1, 2], None)
    stream.put(GenerationDelta("d", [3]))
    stream.put(GenerationDelta("", [], "stop", final=True))
    last = await anext(stream)
    assert (last.text, last.finish_reason) == ("d", "stop")
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    await stream.aclose()
    assert ended == [1] and worker.forgotten == ["r"] and worker.aborted == []  # finished: nothing to abort


async def test_choices_merge_apart_and_the_stream_ends_at_the_final_delta() -> None:
    worker = FakeWorker()
    stream = RequestStream(worker, "r", lambda: None)  # type: ignore[arg-type]
    stream.put(m.Started("r", 3, tool_format="hermes"))
    await stream.started()
    assert stream.tool_format is not None and stream.tool_format.name == "hermes"
    for delta in (
        GenerationDelta("a", [1], index=0),
        GenerationDelta("b", [2], index=0),
        GenerationDelta("x", [3], index=1),
        GenerationDelta("", [], "stop", index=0),  # choice 0 ends: the request goes on
        GenerationDelta("y", [4], "length", index=1, final=True),
    ):
        stream.put(delta)
    got = [(d.index, d.text, d.finish_reason) async for d in stream]
    assert got == [(0, "ab", None), (1, "x", None), (0, "", "stop"), (1, "y", "length")]


async def test_an_error_after_deltas_is_not_swallowed_by_merging() -> None:
    worker = FakeWorker()
    stream = RequestStream(worker, "r", lambda: None)  # type: ignore[arg-type]
    stream.put(m.Started("r", 3))
    await stream.started()
    stream.put(GenerationDelta("a", [1]))
    stream.put(WorkerDied("backend 'x': its engine worker died (SIGKILL)"))
    assert (await anext(stream)).text == "a"
    with pytest.raises(WorkerDied):
        await anext(stream)


async def test_closing_early_aborts_in_the_worker() -> None:
    worker = FakeWorker()
    stream = RequestStream(worker, "r", lambda: None)  # type: ignore[arg-type]
    stream.put(m.Started("r", 3))
    await stream.started()
    await stream.aclose()
    assert worker.aborted == ["r"] and worker.forgotten == ["r"]
