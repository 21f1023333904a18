"""A streamed answer, from its backend's first chunk to the last byte: the one streaming
path of the gateway, whatever the dialect.

    first = await first_chunk(stream, timeout_s)                 # inside the retry loop
    return ChunkStream(first, stream, dialect=..., ...).response()  # after it

`first_chunk` is the only prefetch: until the first chunk a failure may be retried on
another backend, and errors become ordinary HTTP errors. After it, `ChunkStream` hands the
chunks to the request's dialect (gateway.dialects: OpenAI's SSE framing, Anthropic's events,
Ollama's NDJSON), cuts the stream off at the route's total deadline, notes the first token
and the usage in the request's outcome, reports errors in-band in the dialect (the 200
already went out), and has one close point: `close()`, run by the response however it ends
(finished, failed, client gone), which closes the backend's stream (cancelling the
generation, freeing its KV blocks) and then calls `on_close(error)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.protocol import APIError, ChatCompletionChunk, Completion, RawChunk, UpstreamError
from gateway.dialects.base import Dialect
from gateway.outcome import RequestOutcome
from gateway.resume import Resumer

log = logging.getLogger("turnout.streaming")

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # for NDJSON streams as well


async def first_chunk(stream: AsyncIterator[T], timeout_s: float) -> T:
    """The stream's first item within `timeout_s` (the first-token deadline); the stream is
    closed on any failure. asyncio.timeout arms a timer, no task: cheap for every request."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(stream)
    except BaseException:
        await _aclose(stream)
        raise


class ChunkStream:
    """One streamed answer after its first chunk, written in `dialect`. `deadline` is on the
    event loop's clock."""

    def __init__(
        self,
        first: Any,
        rest: AsyncIterator[Any],
        *,
        deadline: float,
        dialect: Dialect,
        outcome: RequestOutcome,
        on_close: Callable[[BaseException | None], None],
        resume: Resumer | None = None,
    ) -> None:
        self.first = first
        self.rest = rest
        self.deadline = deadline
        self.dialect = dialect
        self.outcome = outcome
        self.on_close = on_close
        self.resume = resume
        self.error: BaseException | None = None
        self._closed = False

    def response(self, headers: dict[str, str]) -> StreamingResponse:
        """The streaming response that sends this stream, then closes it."""
        return _EventStreamResponse(self, headers)

    async def events(self) -> AsyncIterator[bytes]:
        """The dialect's bytes for every chunk, or its in-band error if the stream fails."""
        try:
            async with aclosing(self.dialect.events(self._chunks())) as events:
                async for data in events:
                    yield data
        except APIError as exc:
            self.error = exc
            yield self.dialect.stream_error(exc)
        except Exception as exc:
            self.error = exc
            log.exception("stream failed")
            yield self.dialect.stream_error(None)
        except BaseException as exc:  # cancelled: the client left
            self.error = exc
            raise

    async def _chunks(self) -> AsyncIterator[Any]:
        """The backend's chunks, the first one included, until the end or the deadline. With
        `resume`, a backend that fails is taken over by another (gateway.resume)."""
        item = self.first
        resume = self.resume
        while True:
            if resume is not None:
                item = resume.observe(item)
            if item is not None:
                self._note(item)
                yield item
            try:
                async with asyncio.timeout_at(self.deadline):
                    item = await anext(self.rest)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamError("The generation exceeded the route's total timeout.") from None
            except Exception as exc:
                if resume is None or not resume.can_take_over(exc):
                    raise
                await _aclose(self.rest)
                left = resume.serving.lease.name
                try:
                    async with asyncio.timeout_at(self.deadline):
                        item, self.rest = await resume.take_over(exc)
                except TimeoutError:
                    raise UpstreamError("The generation exceeded the route's total timeout.") from None
                self.outcome.resumed_from.append(left)

    def _note(self, item: Any) -> None:
        """Note the first token and the usage. Chunks are models (in-process backends) or
        RawChunks (remote)."""
        outcome = self.outcome
        if item.usage is not None:
            outcome.prompt_tokens = item.usage.prompt_tokens
            outcome.completion_tokens = item.usage.completion_tokens
        if outcome.first_token_at is None and (item.has_text if type(item) is RawChunk else _has_text(item)):
            outcome.first_token()

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
        super().__init__(stream.events(), media_type=stream.dialect.media_type, headers={**SSE_HEADERS, **headers})
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
