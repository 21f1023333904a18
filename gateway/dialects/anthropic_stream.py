"""Anthropic's answers from the contract's: a ChatCompletion as a Message, a stream of
ChatCompletionChunks as Anthropic's server-sent events, count_tokens' usage as its count.

The stream (docs.anthropic.com, "Streaming Messages"):

    message_start (content [], usage {input_tokens: 0, output_tokens: 0})
    ping
    content_block_start / content_block_delta (text_delta | input_json_delta) / content_block_stop, per block
    message_delta (stop_reason, stop_sequence, usage {input_tokens, output_tokens})
    message_stop

The contract tells usage only in its last chunk, after the text: message_start cannot know the
prompt's tokens, so it says 0 and message_delta carries the real `input_tokens` with
`output_tokens` (the official SDKs take both from message_delta into the final message).

Which stop sequence matched: the backends strip it from the text, so when stop sequences
are given the request asks for logprobs (anthropic.to_contract), whose tokens still hold the
stripped text; a finish_reason "stop" whose tokens go on past the text with a stop sequence
is "stop_sequence" (end of turn otherwise: the end-of-turn token has no logprob entry).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from backends.protocol import APIError, ChatCompletion, ChatCompletionChunk, ChoiceLogprobs, UpstreamError
from gateway.dialects.anthropic_types import Message, StopReason, TextOut, TokenCount, ToolUseOut, Usage, new_id
from gateway.dialects.base import SSE
from gateway.errors import error_payload

_STOP_REASON: dict[str | None, StopReason] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def event(name: str, data: dict[str, Any]) -> bytes:
    """One Anthropic server-sent event."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def tool_use_id(contract_id: str | None) -> str:
    """A tool call's id the Anthropic way (`toolu_...`). The client sends it back as the
    tool_result's tool_use_id, which reaches the backend as the call's id: any id works."""
    if not contract_id:
        return new_id("toolu")
    return contract_id if contract_id.startswith("toolu_") else "toolu_" + contract_id.removeprefix("call_")


class StopSeen:
    """Which stop sequence ended a generation: the sampled tokens' text (logprobs) against
    the text the backend gave back, which lacks the stop sequence and what followed it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text: list[str] = []
        self.tokens: list[str] = []

    def add(self, text: str | None, logprobs: ChoiceLogprobs | None) -> None:
        if text:
            self.text.append(text)
        if logprobs is not None and logprobs.content:
            self.tokens.extend(t.token for t in logprobs.content)

    def matched(self) -> str | None:
        """The stop sequence the tokens went on with past the text, if any."""
        if not self.stops:
            return None
        text, sampled = "".join(self.text), "".join(self.tokens)
        tail = sampled[len(text) :] if sampled.startswith(text) else sampled
        starting = [s for s in self.stops if tail.startswith(s)]
        if starting:
            return max(starting, key=len)
        found = [(tail.find(s), s) for s in self.stops if s in tail]
        return min(found)[1] if found else None


def stop_of(finish_reason: str | None, has_calls: bool, seen: StopSeen) -> tuple[StopReason, str | None]:
    """Anthropic's stop_reason and stop_sequence for the contract's finish_reason."""
    if has_calls:
        return "tool_use", None
    reason = _STOP_REASON.get(finish_reason, "end_turn")
    if reason == "end_turn":
        matched = seen.matched()
        if matched is not None:
            return "stop_sequence", matched
    return reason, None


class MessagesDialect:
    """One /v1/messages request's rendering: `model` is the model the client asked for (the
    Message names it), `stop_sequences` what may have ended the answer."""

    route = "anthropic.messages"
    forwards_raw = False
    media_type = SSE

    def __init__(self, *, model: str, stop_sequences: list[str]) -> None:
        self.model = model
        self.stop_sequences = stop_sequences

    def answer(self, result: ChatCompletion) -> bytes:
        """The whole Message. A tool call whose arguments are not a JSON object is a 502:
        Anthropic's `input` is an object, and the call cannot be given half."""
        choice = result.choices[0]
        content: list[TextOut | ToolUseOut] = []
        if choice.message.content:
            content.append(TextOut(text=choice.message.content))
        for call in choice.message.tool_calls or []:
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise UpstreamError(f"The model's call of tool {call.function.name!r} has arguments that are not a JSON object.")
            content.append(ToolUseOut(id=tool_use_id(call.id), name=call.function.name, input=arguments))
        seen = StopSeen(self.stop_sequences)
        seen.add(choice.message.content, choice.logprobs)
        reason, sequence = stop_of(choice.finish_reason, bool(choice.message.tool_calls), seen)
        usage = result.usage
        message = Message(
            content=content,
            model=self.model,
            stop_reason=reason,
            stop_sequence=sequence,
            usage=Usage(input_tokens=usage.prompt_tokens if usage else 0, output_tokens=usage.completion_tokens if usage else 0),
        )
        return message.model_dump_json().encode()

    async def events(self, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[bytes]:
        """Anthropic's events for the contract's chunks. Closing this generator (the client
        left) closes `chunks`, which cancels the generation: nothing here catches that."""
        stream = _MessageStream(self.model, StopSeen(self.stop_sequences))
        yield stream.start()
        async for chunk in chunks:
            for data in stream.feed(chunk):
                yield data
        yield stream.finish()

    def stream_error(self, error: APIError | None) -> bytes:
        """Anthropic's in-band `error` event."""
        if error is None:
            return event("error", error_payload("anthropic", 500, "The server had an error while streaming."))
        return event("error", error_payload("anthropic", error.status, error.message))


class _MessageStream:
    """The state of one streamed Message: the open content block, the tool call it is (by
    the contract's tool-call index), what finished it, the usage."""

    def __init__(self, model: str, seen: StopSeen) -> None:
        self.model = model
        self.seen = seen
        self.index = -1  # the open block's index; -1 before the first
        self.open: str | None = None  # "text" | "tool_use" | None (closed)
        self.call: int | None = None  # the contract's index of the open tool call
        self.has_calls = False
        self.finish_reason: str | None = None
        self.usage = Usage(input_tokens=0, output_tokens=0)

    def start(self) -> bytes:
        message = Message(content=[], model=self.model, usage=self.usage).model_dump(mode="json")
        return event("message_start", {"type": "message_start", "message": message}) + event("ping", {"type": "ping"})

    def feed(self, chunk: ChatCompletionChunk) -> list[bytes]:
        """The events one chunk makes."""
        out: list[bytes] = []
        if chunk.usage is not None:
            self.usage = Usage(input_tokens=chunk.usage.prompt_tokens, output_tokens=chunk.usage.completion_tokens)
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # one answer (no `n` in Anthropic's API)
            delta = choice.delta
            self.seen.add(delta.content, choice.logprobs)
            if delta.content:
                if self.open != "text":
                    out += self._open({"type": "text", "text": ""}, "text")
                out.append(self._delta({"type": "text_delta", "text": delta.content}))
            for call in delta.tool_calls or []:
                if self.open != "tool_use" or call.index != self.call:
                    out += self._open({"type": "tool_use", "id": tool_use_id(call.id), "name": call.function.name or "", "input": {}}, "tool_use")
                    self.call, self.has_calls = call.index, True
                if call.function.arguments:
                    out.append(self._delta({"type": "input_json_delta", "partial_json": call.function.arguments}))
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
        return out

    def finish(self) -> bytes:
        reason, sequence = stop_of(self.finish_reason, self.has_calls, self.seen)
        delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": self.usage.model_dump(exclude={"service_tier"})}
        return b"".join([*self._close(), event("message_delta", delta), event("message_stop", {"type": "message_stop"})])

    def _open(self, block: dict[str, Any], kind: str) -> list[bytes]:
        out = self._close()
        self.index += 1
        self.open = kind
        out.append(event("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}))
        return out

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})


class CountTokensDialect:
    """count_tokens' answer: the one-token generation's prompt tokens."""

    route = "anthropic.count_tokens"
    forwards_raw = False
    media_type = SSE  # never streamed

    def answer(self, result: ChatCompletion) -> bytes:
        if result.usage is None:
            raise UpstreamError("The backend reported no usage, so the prompt's tokens cannot be counted.")
        return TokenCount(input_tokens=result.usage.prompt_tokens).model_dump_json().encode()

    async def events(self, chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:  # pragma: no cover - never streamed
        raise NotImplementedError("count_tokens is never streamed")
        yield b""

    def stream_error(self, error: APIError | None) -> bytes:  # pragma: no cover - never streamed
        return b""
