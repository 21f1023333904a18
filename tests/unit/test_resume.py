"""Stream resume (gateway.resume) through the one streaming path: a stream whose backend
fails goes on from a continuation, and the client sees one stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backends.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    ChunkFunctionCall,
    ChunkToolCall,
    Completion,
    CompletionChoice,
    CompletionRequest,
    InvalidRequest,
    RawChunk,
    UpstreamError,
    Usage,
)
from backends.remote.upstream_errors import RemoteFailure
from gateway.dialects.base import OpenAIDialect
from gateway.outcome import RequestOutcome
from gateway.resume import Resumer, Serving, ask_for_usage, resumable
from gateway.streaming import ChunkStream


class FakeLease:
    def __init__(self, name: str) -> None:
        self.name = name
        self.released = False
        self.slot: object | None = None

    def release(self) -> None:
        self.released = True

    def pass_slot(self, to: FakeLease) -> None:
        to.slot, self.slot = self.slot, None


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def chat_chunk(cid: str, delta: ChunkDelta, used: Usage | None, finish: str | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=cid, created=1, model="m", choices=[ChunkChoice(delta=delta, finish_reason=finish)], usage=used)  # type: ignore[arg-type]


async def fails_after(items: list[Any], error: BaseException) -> AsyncIterator[Any]:
    for item in items:
        yield item
    raise error


async def ends_after(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def chat_body(**fields: Any) -> ChatCompletionRequest:
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0, "seed": 3, "stream": True}
    return ChatCompletionRequest.model_validate({**data, **fields})


async def run_stream(body: Any, first_stream: AsyncIterator[Any], continuation: list[Any] | None, *, usage_chunk: bool = True) -> dict[str, Any]:
    """The client's events of one resumable stream; what the reopen saw; the leases."""
    client_continuous = ask_for_usage(body, continuous=True)
    seen: dict[str, Any] = {"asked": []}
    first_lease, second_lease = FakeLease("a"), FakeLease("b")
    first_lease.slot = "slot"

    async def reopen(request: Any, failed: frozenset[str]) -> tuple[Any, AsyncIterator[Any], Serving]:
        seen["asked"].append((request, failed))
        if continuation is None:
            raise UpstreamError("no backend left")
        rest = ends_after(continuation)
        return await anext(rest), rest, Serving(second_lease, None)

    resumer = Resumer(body, Serving(first_lease, None), reopen, client_continuous=client_continuous)
    closed: list[Any] = []
    first = await anext(first_stream)
    stream = ChunkStream(
        first, first_stream, deadline=asyncio.get_running_loop().time() + 30,
        dialect=OpenAIDialect("chat", strip_usage=not usage_chunk), outcome=RequestOutcome(request_id="r", route="chat", model="m"),
        on_close=lambda error: closed.append((resumer.serving.lease.name, error)), resume=resumer,
    )  # fmt: skip
    events = [e async for e in stream.events()]
    await stream.close()
    seen.update(events=events, leases=(first_lease, second_lease), closed=closed, outcome=stream.outcome)
    return seen


def payloads(events: list[bytes]) -> list[Any]:
    data = b"".join(events).decode().split("\n\n")
    return [json.loads(e.removeprefix("data: ")) for e in data if e and e != "data: [DONE]"]


async def test_a_chat_stream_goes_on_elsewhere_as_one_stream() -> None:
    body = chat_body(stream_options={"include_usage": True})
    first = fails_after(
        [
            chat_chunk("one", ChunkDelta(role="assistant", content=""), usage(5, 0)),
            chat_chunk("one", ChunkDelta(content="Hel"), usage(5, 1)),
            chat_chunk("one", ChunkDelta(content="lo"), usage(5, 2)),
        ],
        UpstreamError("worker died"),
    )
    # The continuation's prompt holds "Hello" (2 tokens): 7; it generates 2 more.
    rest = [
        chat_chunk("two", ChunkDelta(role="assistant", content=""), usage(7, 0)),
        chat_chunk("two", ChunkDelta(content=" world"), usage(7, 1)),
        chat_chunk("two", ChunkDelta(), usage(7, 2), finish="stop"),
        ChatCompletionChunk(id="two", created=2, model="m", choices=[], usage=usage(7, 2)),
    ]
    seen = await run_stream(body, first, rest)
    (asked, failed), = seen["asked"]
    assert failed == {"a"}
    assert asked.messages[-1].role == "assistant" and asked.messages[-1].content == "Hello"
    assert asked.continue_final_message and asked.add_generation_prompt is False and not asked.generation_prompt()
    assert (asked.max_tokens, asked.seed, asked.temperature) == (8, 3, 0)
    out = payloads(seen["events"])
    assert {p["id"] for p in out} == {"one"}, "one stream: the first stream's id throughout"
    assert [p["choices"][0]["delta"].get("role") for p in out if p["choices"]].count("assistant") == 1
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in out if p["choices"]) == "Hello world"
    assert [p["choices"][0]["finish_reason"] for p in out if p["choices"] and p["choices"][0]["finish_reason"]] == ["stop"]
    assert all(p["usage"] is None for p in out if p["choices"]), "usage on every chunk was the gateway's, not the client's"
    assert out[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}  # each token once
    assert seen["events"][-1] == b"data: [DONE]\n\n" and sum(e.count(b"[DONE]") for e in seen["events"]) == 1
    first_lease, second_lease = seen["leases"]
    assert first_lease.released and second_lease.slot == "slot" and first_lease.slot is None
    assert seen["closed"] == [("b", None)]
    assert (seen["outcome"].prompt_tokens, seen["outcome"].completion_tokens) == (5, 4)


async def test_a_client_that_asked_for_continuous_usage_keeps_it() -> None:
    body = chat_body(stream_options={"include_usage": True, "continuous_usage_stats": True})
    first = ends_after([chat_chunk("one", ChunkDelta(content="x"), usage(5, 1), finish="stop")])
    seen = await run_stream(body, first, None)
    assert payloads(seen["events"])[0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}


async def test_a_remote_streams_raw_chunks_are_read_and_kept_as_bytes() -> None:
    body = chat_body()
    raw = json.dumps({"id": "r1", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": usage(4, 1).model_dump()})
    first = fails_after([RawChunk(raw.encode(), usage=usage(4, 1), has_text=True, text="Hi")], RemoteFailure("connection reset", failure="connect"))
    rest = [chat_chunk("two", ChunkDelta(content="!"), usage(5, 1), finish="stop")]
    seen = await run_stream(body, first, rest, usage_chunk=False)
    (asked, _), = seen["asked"]
    assert asked.messages[-1].content == "Hi" and asked.max_tokens == 9
    out = payloads(seen["events"])
    assert [p["id"] for p in out] == ["r1", "r1"] and out[0]["usage"] is None and out[0]["choices"][0]["delta"]["content"] == "Hi"


async def test_a_completion_continues_its_prompt() -> None:
    body = CompletionRequest(model="m", prompt="Once", max_tokens=5, stream=True)
    first = fails_after([Completion(id="c1", model="m", choices=[CompletionChoice(text=" upon")], usage=usage(1, 1))], UpstreamError("died"))
    rest = [Completion(id="c2", model="m", choices=[CompletionChoice(text=" a time", finish_reason="length")], usage=usage(2, 2))]
    seen = await run_stream(body, first, rest)
    (asked, _), = seen["asked"]
    assert asked.prompt == "Once upon" and asked.max_tokens == 4
    out = payloads(seen["events"])
    assert [p["id"] for p in out] == ["c1", "c1"] and "".join(p["choices"][0]["text"] for p in out) == " upon a time"


@pytest.mark.parametrize(
    ("error", "tool_call"),
    [(InvalidRequest("bad token"), False), (UpstreamError("died"), True)],
    ids=["the request's own fault", "after a tool call"],
)
async def test_what_is_not_resumed_ends_with_its_error(error: BaseException, tool_call: bool) -> None:
    body = chat_body()
    delta = (
        ChunkDelta(tool_calls=[ChunkToolCall(index=0, id="call_1", type="function", function=ChunkFunctionCall(name="f", arguments=""))])
        if tool_call
        else ChunkDelta(content="Hi")
    )
    seen = await run_stream(body, fails_after([chat_chunk("one", delta, usage(5, 1))], error), [])
    assert seen["asked"] == []
    assert "error" in payloads(seen["events"])[-1] and seen["closed"][0][0] == "a"


async def test_when_no_backend_can_take_over_the_original_error_ends_the_stream() -> None:
    seen = await run_stream(chat_body(), fails_after([chat_chunk("one", ChunkDelta(content="Hi"), usage(5, 1))], UpstreamError("worker died")), None)
    assert len(seen["asked"]) == 1
    assert payloads(seen["events"])[-1]["error"]["message"] == "worker died"
    assert seen["closed"][0][0] == "a" and isinstance(seen["closed"][0][1], UpstreamError)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (chat_body(), True),
        (chat_body(n=2), False),
        (chat_body(response_format={"type": "json_object"}), False),
        (chat_body(response_format={"type": "text"}), True),
        (chat_body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"), False),
        (chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), True),
        (CompletionRequest(model="m", prompt="p"), True),
        (CompletionRequest(model="m", prompt="p", echo=True), False),
        (CompletionRequest(model="m", prompt=[1, 2]), False),
    ],
)
def test_which_streams_can_be_resumed(body: Any, expected: bool) -> None:
    assert resumable(body) is expected
