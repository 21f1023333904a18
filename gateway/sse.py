"""Server-sent events in OpenAI's framing: `data: {json}` per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from backends.protocol import BackendError, RawChunk

log = logging.getLogger("turnout.sse")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode(item: BaseModel | RawChunk) -> bytes:
    if type(item) is RawChunk:
        return b"data: " + item.data + b"\n\n"  # the upstream's bytes, as they came
    return b"data: " + item.model_dump_json().encode() + b"\n\n"  # type: ignore[union-attr]


async def _events(first: BaseModel, rest: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    # aclosing: a client that leaves mid-stream closes the backend's stream at once,
    # which cancels the generation and frees what it holds.
    async with aclosing(rest):  # type: ignore[type-var]
        yield encode(first)
        try:
            async for item in rest:
                yield encode(item)
        except BackendError as exc:
            # Bytes already went out, so the status is 200: report in-band, as OpenAI does.
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        except Exception:
            log.exception("stream failed")
            body = {"error": {"message": "The server had an error while streaming.", "type": "server_error", "param": None, "code": None}}
            yield b"data: " + json.dumps(body).encode() + b"\n\n"
    yield DONE


async def stream_response(stream: AsyncIterator[BaseModel], headers: dict[str, str] | None = None) -> StreamingResponse:
    """Start the stream and answer with SSE. The first item is awaited here, so errors
    before the first byte (bad input, overload) raise and become ordinary HTTP errors."""
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise
    return StreamingResponse(
        _events(first, stream), media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
    )
