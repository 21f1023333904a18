"""A streamed answer, from its backend's first chunk to the last SSE byte: the one streaming
path of the gateway.

    first = await first_chunk(stream, timeout_s)        # inside the retry loop
    return ChunkStream(first, stream, ...).response()   # after it

`first_chunk` is the only prefetch: until the first chunk a failure may be retried on
another backend, and errors become ordinary HTTP errors. After it, `ChunkStream` sends
OpenAI's SSE framing (`data: {json}` per chunk, then `data: [DONE]`), cuts the stream off at
the route's total deadline, notes the first token and the usage in the request's outcome,
reports errors in-band (the 200 already went out), and has one close point: `close()`, run
by the response however it ends (finished, failed, client gone), which closes the backend's
stream (cancelling the generation, freeing its KV blocks) and then calls `on_close(error)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.protocol import APIError, ChatCompletionChunk, Completion, RawChunk, UpstreamError, error_body
from gateway.outcome import RequestOutcome

log = logging.getLogger("turnout.streaming")

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_STREAM_FAILED = json.dumps(error_body("The server had an error while streaming.", "server_error")).encode()


async def first_chunk(stream: AsyncIterator[T], timeout_s: float) -> T:
    """The stream's first item within `timeout_s` (the first-token deadline); the stream is
    closed on any failure. asyncio.timeout arms a timer, no task: cheap for every request."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(stream)
    except BaseException:
        await _aclose(stream)
        raise


def encode(item: BaseModel | RawChunk) -> bytes:
    """One SSE event: the upstream's own bytes for a RawChunk, else the model's JSON."""
    if type(item) is RawChunk:
        return b"data: " + item.data + b"\n\n"
    return b"data: " + item.model_dump_json().encode() + b"\n\n"  # type: ignore[union-attr]


class ChunkStream:
    """One streamed answer after its first chunk. `deadline` is on the event loop's clock;
    `strip_usage` drops the usage-only chunk the client did not ask for (the gateway asks
    every backend for usage, to settle token limits)."""

    def __init__(
        self,
        first: Any,
        rest: AsyncIterator[Any],
        *,
        deadline: float,
        strip_usage: bool,
        outcome: RequestOutcome,
        on_close: Callable[[BaseException | None], None],
    ) -> None:
        self.first = first
        self.rest = rest
        self.deadline = deadline
        self.strip_usage = strip_usage
        self.outcome = outcome
        self.on_close = on_close
        self.error: BaseException | None = None
        self._closed = False

    def response(self, headers: dict[str, str]) -> StreamingResponse:
        """The SSE response that sends this stream, then closes it."""
        return _EventStreamResponse(self, headers)

    async def events(self) -> AsyncIterator[bytes]:
        """The SSE bytes: every chunk the client should see, an in-band error if the stream
        fails, then [DONE]."""
        try:
            if self._keep(self.first):
                yield encode(self.first)
            while True:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        item = await anext(self.rest)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise UpstreamError("The generation exceeded the route's total timeout.") from None
                if self._keep(item):
                    yield encode(item)
        except APIError as exc:
            self.error = exc
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        except Exception as exc:
            self.error = exc
            log.exception("stream failed")
            yield b"data: " + _STREAM_FAILED + b"\n\n"
        except BaseException as exc:  # cancelled: the client left
            self.error = exc
            raise
        yield DONE

    def _keep(self, item: Any) -> bool:
        """Note the first token and the usage; False for a usage chunk to drop. Chunks are
        models (in-process backends) or RawChunks (remote)."""
        raw = type(item) is RawChunk
        outcome = self.outcome
        if item.usage is not None:
            outcome.prompt_tokens = item.usage.prompt_tokens
            outcome.completion_tokens = item.usage.completion_tokens
            if self.strip_usage and not (item.has_choices if raw else item.choices):
                return False
        if outcome.first_token_at is None and (item.has_text if raw else _has_text(item)):
            outcome.first_token()
        return True

    async def close(self) -> None:
        """Close the backend's stream, then `on_close(error)`. Once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            await _aclose(self.rest)
        finally:
            self.on_close(self.error)


class _EventStreamResponse(StreamingResponse):
    """StreamingResponse over `stream.events()` that closes the stream when it is done,
    also when the client left before the first byte (the events never started)."""

    def __init__(self, stream: ChunkStream, headers: dict[str, str]) -> None:
        super().__init__(stream.events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException as exc:  # the client left (ClientDisconnect, cancellation)
            if self.stream.error is None:
                self.stream.error = exc
            raise
        finally:
            await _aclose(self.body_iterator)
            await self.stream.close()


def _has_text(chunk: ChatCompletionChunk | Completion) -> bool:
    """Whether a chat or completion chunk model carries generated text (or a tool call)."""
    if not chunk.choices:
        return False
    if isinstance(chunk, ChatCompletionChunk):
        delta = chunk.choices[0].delta
        return bool(delta.content or delta.tool_calls)
    return bool(chunk.choices[0].text)


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
