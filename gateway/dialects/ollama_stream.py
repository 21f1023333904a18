"""Ollama's answers from the contract's (gateway.dialects.base.Dialect): NDJSON records for
/api/chat and /api/generate, a whole record when not streamed, and the embedding answers.

Durations are measured here, at the edge, in nanoseconds on one monotonic clock from the
moment the route got the request (`Timer`):
- load_duration: when no local backend of the route's pool had its model loaded at arrival,
  the time until one had (watched every LOAD_POLL_S); otherwise 0 (remote backends: 0, their
  loads are inside their first token).
- prompt_eval_duration: streamed, arrival (less the load) until the first token arrived; a
  whole answer comes at once, so the edge cannot see where the prompt ended: 0.
- eval_duration: streamed, the first token until the last chunk; whole, arrival (less the
  load) until the answer.
- total_duration: arrival until the final record was written.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timezone
from typing import Any, Literal

from backends.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    EmbeddingResponse,
    UpstreamError,
    Usage,
)
from backends.worker.backend import LocalModelBackend
from gateway.dialects.ollama_types import (
    ChatRecord,
    EmbedAnswer,
    EmbeddingAnswer,
    ErrorRecord,
    GenerateRecord,
    Metrics,
    OutFunction,
    OutMessage,
    OutToolCall,
)

NDJSON = "application/x-ndjson"
LOAD_POLL_S = 0.005
Shape = Literal["chat", "generate", "embed", "embeddings"]

# Ollama's done_reason for the contract's finish_reason (a tool call ends with "stop" there).
_DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}


def rfc3339(epoch: float | None = None) -> str:
    """A UTC time as RFC 3339 with microseconds (Ollama's `created_at`, `modified_at`)."""
    moment = datetime.now(timezone.utc) if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class Timer:
    """A request's phases on the perf_counter_ns clock, from its arrival at the route."""

    def __init__(self) -> None:
        self.start = time.perf_counter_ns()
        self.loaded_at: int | None = None
        self.first_at: int | None = None
        self.last_at: int | None = None
        self._watch: asyncio.Task[None] | None = None
        self._cold: list[LocalModelBackend] = []

    def watch(self, backends: Iterable[Any]) -> None:
        """Watch for a model load when none of the pool's local backends is loaded now."""
        local = [b for b in backends if isinstance(b, LocalModelBackend)]
        if local and not any(b.loaded for b in local):
            self._cold = local
            self._watch = asyncio.get_running_loop().create_task(self._until_loaded())

    async def _until_loaded(self) -> None:
        while not any(b.loaded for b in self._cold):
            await asyncio.sleep(LOAD_POLL_S)
        self.loaded_at = time.perf_counter_ns()

    def settle(self) -> None:
        """Stop watching (the route is done with the backend's first answer, or failed): a
        load that finished since the last poll counts up to now."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
            if self.loaded_at is None and any(b.loaded for b in self._cold):
                self.loaded_at = time.perf_counter_ns()

    def metrics(self, usage: Usage | None, *, streamed: bool) -> Metrics:
        """The final record's counts and durations."""
        self.settle()
        end = time.perf_counter_ns()
        load = self.loaded_at - self.start if self.loaded_at is not None else 0
        if streamed and self.first_at is not None:
            prompt = max(0, self.first_at - self.start - load)
            generating = max(0, (self.last_at or end) - self.first_at)
        else:
            prompt, generating = 0, max(0, end - self.start - load)
        return Metrics(
            total_duration=end - self.start,
            load_duration=load,
            prompt_eval_count=usage.prompt_tokens if usage is not None else 0,
            prompt_eval_duration=prompt,
            eval_count=usage.completion_tokens if usage is not None else 0,
            eval_duration=generating,
        )


def _arguments(text: str | None, name: str) -> dict[str, Any]:
    """A call's JSON-text arguments as the object Ollama sends."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UpstreamError(f"the model's call of {name!r} has arguments that are not a JSON object")
    return value


class OllamaDialect:
    """One Ollama request's answer. `shape`: which endpoint's records; `shown`: the model
    name as the client gave it (echoed, as Ollama does); `load`: a load-only request
    ("load" or "unload"), whose generation's text is dropped."""

    forwards_raw = False  # Ollama's body is not the contract's: remotes get the translation

    def __init__(self, route: str, shape: Shape, shown: str, timer: Timer, *, streamed: bool = False, load: str | None = None) -> None:
        self.route = route
        self.shape = shape
        self.shown = shown
        self.timer = timer
        self.load = load
        self.media_type = NDJSON if streamed else "application/json"

    # -- records ------------------------------------------------------------------------------

    def _record(self, text: str, *, calls: list[OutToolCall] | None = None, done: bool = False, reason: str | None = None) -> ChatRecord | GenerateRecord:
        if self.shape == "chat":
            message = OutMessage(content=text, tool_calls=calls or None)
            return ChatRecord(model=self.shown, created_at=rfc3339(), message=message, done=done, done_reason=reason)
        return GenerateRecord(model=self.shown, created_at=rfc3339(), response=text, done=done, done_reason=reason)

    def _final(self, text: str, calls: list[OutToolCall] | None, reason: str, usage: Usage | None, *, streamed: bool) -> bytes:
        record = self._record(text, calls=calls, done=True, reason=reason)
        for field, value in self.timer.metrics(usage, streamed=streamed):
            setattr(record, field, value)
        return record.line()

    # -- Dialect ------------------------------------------------------------------------------

    def answer(self, result: Any) -> bytes:
        """The whole answer: one record with done true (embeddings: Ollama's embed answers)."""
        if self.load is not None:
            self.timer.settle()
            return self._record("", done=True, reason=self.load).line()
        if isinstance(result, EmbeddingResponse):
            return self._embeddings(result)
        if isinstance(result, ChatCompletion):
            choice = result.choices[0]
            calls = [
                OutToolCall(function=OutFunction(name=c.function.name, arguments=_arguments(c.function.arguments, c.function.name)))
                for c in choice.message.tool_calls or []
            ]
            text, finish = choice.message.content or "", choice.finish_reason
        else:
            text, finish, calls = result.choices[0].text, result.choices[0].finish_reason, []
        return self._final(text, calls, _DONE_REASON.get(finish or "stop", "stop"), result.usage, streamed=False)

    def _embeddings(self, result: EmbeddingResponse) -> bytes:
        vectors = [list(e.embedding) for e in sorted(result.data, key=lambda e: e.index)]  # floats: encoding_format float
        if self.shape == "embeddings":
            return EmbeddingAnswer(embedding=vectors[0] if vectors else []).line()
        metrics = self.timer.metrics(None, streamed=False)
        return EmbedAnswer(
            model=self.shown,
            embeddings=vectors,
            total_duration=metrics.total_duration,
            load_duration=metrics.load_duration,
            prompt_eval_count=result.usage.prompt_tokens,
        ).line()

    async def events(self, chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        """A record per piece of text; tool calls whole, in one record once their arguments
        are complete (Ollama streams no fragments of a call); then the final record with the
        counts from the usage chunk that ends every stream."""
        timer = self.timer
        calls: dict[int, list[str]] = {}  # index -> [name, arguments so far]
        reason, usage = "stop", None
        async for chunk in chunks:
            now = time.perf_counter_ns()
            timer.last_at = now
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if isinstance(chunk, ChatCompletionChunk):
                    text = choice.delta.content
                    for call in choice.delta.tool_calls or []:
                        timer.first_at = timer.first_at or now
                        entry = calls.setdefault(call.index, ["", ""])
                        entry[0] += call.function.name or ""
                        entry[1] += call.function.arguments or ""
                else:  # a Completion chunk (raw /api/generate)
                    text = choice.text
                if text:
                    timer.first_at = timer.first_at or now
                    yield self._record(text).line()
                if choice.finish_reason is not None:
                    reason = _DONE_REASON.get(choice.finish_reason, "stop")
                    if calls:
                        whole = [OutToolCall(function=OutFunction(name=n, arguments=_arguments(a, n))) for _, (n, a) in sorted(calls.items())]
                        calls.clear()
                        yield self._record("", calls=whole).line()
        yield self._final("", None, reason, usage, streamed=True)

    def stream_error(self, error: APIError | None) -> bytes:
        """Ollama's in-band error: a record of `{"error": ...}` (its client raises it)."""
        message = error.message if error is not None else "The server had an error while streaming."
        return ErrorRecord(error=message).line()
