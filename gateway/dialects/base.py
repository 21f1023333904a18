"""What a dialect gives the one request path (gateway.generate): how an answer is written,
and how a stream of the contract's chunks becomes the dialect's stream. OpenAI's own dialect,
the contract itself, is here too.

A dialect route parses its own body, translates it to a ChatCompletionRequest,
CompletionRequest or EmbeddingRequest (a 400 in its own shape for what it cannot), and calls
`generate(kind, body, raw, request, dialect)` with a Dialect built for that request. Errors
before the first byte are HTTP errors, shaped by the URL (gateway.errors.dialect_of); errors
after it go in-band through `stream_error`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from pydantic import BaseModel

from backends.protocol import APIError, RawChunk, error_body

SSE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
_STREAM_FAILED = error_body("The server had an error while streaming.", "server_error")


class Dialect(Protocol):
    """One request's rendering in a dialect."""

    route: str  # the request's route label in metrics and the access log ("chat", "anthropic.messages", ...)
    forwards_raw: bool  # the client's body is the contract's own, so a remote may forward its bytes as sent
    media_type: str  # of a streamed answer

    def answer(self, result: Any) -> bytes:
        """A whole answer's body (the backend's ChatCompletion, Completion or EmbeddingResponse)."""

    def events(self, chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        """A stream's bytes from the backend's chunks (models, or RawChunks where
        `forwards_raw`), with the dialect's own ending once the chunks end."""

    def stream_error(self, error: APIError | None) -> bytes:
        """The in-band error that ends a failed stream (None: an unexpected failure)."""


def sse(data: bytes) -> bytes:
    """One server-sent event of data only."""
    return b"data: " + data + b"\n\n"


def encode(item: BaseModel | RawChunk) -> bytes:
    """One OpenAI SSE event: the upstream's own bytes for a RawChunk, else the model's JSON."""
    if type(item) is RawChunk:
        return sse(item.data)  # type: ignore[union-attr]
    return sse(item.model_dump_json().encode())  # type: ignore[union-attr]


class OpenAIDialect:
    """The contract itself: chunks as `data: {json}` events, then `data: [DONE]`.
    `strip_usage` drops the usage-only chunk the client did not ask for (the gateway asks
    every backend for usage, to settle token limits)."""

    forwards_raw = True
    media_type = SSE

    def __init__(self, route: str, *, strip_usage: bool = False) -> None:
        self.route = route
        self.strip_usage = strip_usage

    def answer(self, result: BaseModel) -> bytes:
        return result.model_dump_json().encode()

    async def events(self, chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        async for item in chunks:
            if self.strip_usage and item.usage is not None and not (item.has_choices if type(item) is RawChunk else item.choices):
                continue
            yield encode(item)
        yield DONE

    def stream_error(self, error: APIError | None) -> bytes:
        return sse(json.dumps(error.body() if error is not None else _STREAM_FAILED).encode()) + DONE
