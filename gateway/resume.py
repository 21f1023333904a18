"""Stream resume: a stream whose backend dies after bytes reached the client goes on, on
another backend of the route that serves the same model, and the client sees one stream
(one `id`, one finish, usage counting each token once). Routes opt in with `resume: true`.

How: while the stream runs, `Resumer.observe` keeps the text sent so far and the prompt's
token count (backends report usage on every chunk: vLLM's `continuous_usage_stats`, asked
for by the gateway and taken off the chunks again unless the client asked for it). When the
backend fails, `take_over` sends a continuation to another backend: for a chat, the messages
plus the text so far as the final assistant message with `continue_final_message` (no new
generation prompt, as vLLM's option); for a text completion, the prompt plus the text. Same
sampling settings and seed, the output limit less what was generated. At temperature 0 that
is the same text an uninterrupted run gives, and on a node that saw the prompt, mostly a
prefix-cache hit. The continuation's chunks take the first stream's id, lose their role
chunk, and have their usage rewritten as the whole answer's.

Not resumed (the in-band error ends the stream as before): n > 1, constrained output
(response_format, a required or named tool), a stream that already sent a tool call, echo,
a suffix, and a completion prompt that is not one string.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from backends.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
    RawChunk,
    StreamOptions,
    Usage,
)
from gateway.tracing import Tracing
from policies.retry import classify, may_resume

log = logging.getLogger("turnout.resume")

Body = ChatCompletionRequest | CompletionRequest
# Opens the continuation on a backend other than those named: (its first chunk, the rest, the
# serving lease and span). Raises when no backend can take it.
Reopen = Callable[[Body, frozenset[str]], Awaitable[tuple[Any, AsyncIterator[Any], "Serving"]]]


@dataclass
class Serving:
    """Where a stream is being served now: its backend's lease and span (replaced when the
    stream resumes elsewhere)."""

    lease: Any
    span: Any

    def retire(self, error: BaseException) -> None:
        """The backend failed and another took over: free its lease, end its span failed."""
        self.lease.release()
        if self.span is not None:
            Tracing.fail(self.span, str(error))
            self.span.end()


def resumable(body: Body) -> bool:
    """Whether a continuation could produce what the rest of this stream would have."""
    if (body.n or 1) > 1:
        return False
    if isinstance(body, ChatCompletionRequest):
        constrained = body.response_format is not None and body.response_format.type != "text"
        return not constrained and body.tool_choice in (None, "auto", "none") and not body.continue_final_message
    return not body.echo and body.suffix is None and isinstance(body.single_prompt(), str)


def ask_for_usage(body: Body, *, continuous: bool) -> bool:
    """Turn on the usage the gateway needs from the backend (its final usage chunk, and usage
    on every chunk where the stream may resume). Returns whether the client itself asked
    for usage on every chunk (then it keeps it)."""
    asked = body.stream_options
    client_continuous = bool(asked and asked.include_usage and asked.continuous_usage_stats)
    body.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=continuous or client_continuous)
    return client_continuous


class Resumer:
    """One resumable stream's memory, and its take-over when its backend fails."""

    def __init__(self, body: Body, serving: Serving, reopen: Reopen, *, client_continuous: bool) -> None:
        self.body = body
        self.serving = serving
        self.reopen = reopen
        self.client_continuous = client_continuous
        self.text: list[str] = []
        self.prompt_tokens: int | None = None  # the original prompt's, from the first usage seen
        self.generated = 0  # tokens generated so far, all backends together
        self.stream_id: str | None = None
        self.created: int | None = None
        self.called_tools = False
        self.failed: set[str] = set()
        self._continuing = False  # the chunks now come from a continuation

    # -- along the stream --------------------------------------------------------------------

    def observe(self, item: Any) -> Any | None:
        """One chunk on its way to the client: a continuation's made the first stream's,
        then noted. None: a chunk to drop (a continuation's role chunk)."""
        if type(item) is RawChunk:
            return self._observe_raw(item)
        if self._continuing:
            item = self._as_first_streams(item)
            if item is None:
                return None
        elif self.stream_id is None:
            self.stream_id, self.created = item.id, item.created
        if item.choices:
            choice = item.choices[0]
            if isinstance(item, ChatCompletionChunk):
                self.called_tools |= bool(choice.delta.tool_calls)
                text = choice.delta.content
            else:
                text = choice.text
            if text:
                self.text.append(text)
        if item.usage is not None:
            self._count(item.usage)
            if item.choices and not self.client_continuous:
                item.usage = None  # asked for by the gateway, not by the client
        return item

    def _observe_raw(self, item: RawChunk) -> RawChunk:
        """A remote's chunk, as its bytes (only the first stream is forwarded raw)."""
        if self.stream_id is None or (item.usage is not None and item.has_choices and not self.client_continuous):
            obj = json.loads(item.data)
            if self.stream_id is None:
                self.stream_id, self.created = obj.get("id"), obj.get("created")
            if item.usage is not None and item.has_choices and not self.client_continuous:
                obj["usage"] = None
                item.data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        if item.text:
            self.text.append(item.text)
        elif item.has_text:
            self.called_tools = True  # text-bearing without text: a tool call
        if item.usage is not None:
            self._count(item.usage)
        return item

    def _count(self, usage: Usage) -> None:
        if self.prompt_tokens is None:
            self.prompt_tokens = usage.prompt_tokens
        self.generated = usage.completion_tokens

    def _as_first_streams(self, item: ChatCompletionChunk | Completion) -> ChatCompletionChunk | Completion | None:
        """A continuation's chunk as part of the first stream: its id, no second role chunk,
        usage counted from the original prompt (the continuation's prompt holds the text so
        far, which was generated once, by the backend that failed)."""
        if isinstance(item, ChatCompletionChunk) and item.choices:
            delta = item.choices[0].delta
            if delta.role is not None and not delta.content and not delta.tool_calls and item.choices[0].finish_reason is None:
                return None
            delta.role = None
        item.id = self.stream_id or item.id
        item.created = self.created or item.created
        if item.usage is not None:
            prompt = self.prompt_tokens if self.prompt_tokens is not None else item.usage.prompt_tokens
            completion = (item.usage.prompt_tokens - prompt) + item.usage.completion_tokens
            item.usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        return item

    # -- when the backend fails --------------------------------------------------------------

    def can_take_over(self, exc: BaseException) -> bool:
        """Whether this failure may be resumed elsewhere: its backend failed (not the request),
        the text so far can be continued, and the prompt's size is known."""
        return may_resume(classify(exc)) and not self.called_tools and self.prompt_tokens is not None and self._remaining() != 0

    def _remaining(self) -> int | None:
        limit = self.body.output_limit()
        return None if limit is None else max(limit - self.generated, 0)

    def continuation(self) -> Body:
        """The request that goes on from the text so far."""
        text = "".join(self.text)
        update: dict[str, Any] = {}
        remaining = self._remaining()
        if remaining is not None:
            update["max_tokens"] = remaining
            if isinstance(self.body, ChatCompletionRequest):
                update["max_completion_tokens"] = None
        if text and isinstance(self.body, ChatCompletionRequest):
            update["messages"] = [*self.body.messages, ChatMessage(role="assistant", content=text)]
            update.update(continue_final_message=True, add_generation_prompt=False)
        elif text:
            update["prompt"] = self.body.single_prompt() + text  # type: ignore[operator]
        return self.body.model_copy(update=update)

    async def take_over(self, exc: BaseException) -> tuple[Any, AsyncIterator[Any]]:
        """Open the continuation on another backend; its first chunk and the rest. Raises
        `exc` when no backend could take it (the stream then ends with its error)."""
        failed_name = self.serving.lease.name
        self.failed.add(failed_name)
        try:
            first, rest, serving = await self.reopen(self.continuation(), frozenset(self.failed))
        except Exception as reopen_error:
            log.warning("stream on %r failed (%s); no backend could resume it: %s", failed_name, exc, reopen_error)
            raise exc from reopen_error
        self.serving.lease.pass_slot(serving.lease)
        self.serving.retire(exc)
        self.serving = serving
        self._continuing = True
        log.warning("stream on %r failed (%s); resumed on %r after %d tokens", failed_name, exc, serving.lease.name, self.generated)
        return first, rest
