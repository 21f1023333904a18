"""OpenAI's Responses API, stateless (docs/api.md, "The Responses API"): `POST /v1/responses`
translated onto the contract's chat completion (gateway.dialects.responses_translate) and
answered as the Response object or its `response.*` events (gateway.dialects.responses_stream)
through the one request path, so auth, limits, routing, admission, A/B, metrics, traces and
the access log apply. Errors are OpenAI's (gateway.errors: /v1/responses speaks "openai").

Nothing is stored: `store: true`, `previous_response_id` and `conversation` are 400s, and
there is no GET /v1/responses/{id}.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from backends.protocol import InvalidRequest
from gateway.body import LARGE_BODY_BYTES, parse_body
from gateway.dialects.responses_stream import ResponsesDialect
from gateway.dialects.responses_translate import renamed, template, to_chat
from gateway.dialects.responses_types import ResponsesRequest
from gateway.generate import generate, unless_disconnected
from policies.schema import ServerConfig

router = APIRouter()


def _server(request: Request) -> ServerConfig:
    snapshot = request.scope.get("state", {}).get("snapshot")
    return snapshot.config.server if snapshot is not None else ServerConfig()


@router.post("/v1/responses", response_model=None)
async def create_response(request: Request) -> Response:
    """A model response to `input`: the whole Response, or its events with `stream: true`."""
    body, raw = await parse_body(request, ResponsesRequest)
    server = _server(request)
    if len(raw) > LARGE_BODY_BYTES:  # a long conversation: its translation off the event loop
        chat, origin = await asyncio.to_thread(to_chat, body, server)
    else:
        chat, origin = to_chat(body, server)
    dialect = ResponsesDialect(template(body), streamed=bool(body.stream))
    try:
        return await unless_disconnected(request, generate("chat", chat, raw, request, dialect))
    except InvalidRequest as exc:  # a backend's 400 (before the first byte) names the contract's field
        raise renamed(exc, origin) from None
