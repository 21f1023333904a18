"""The OpenAI routes, health checks and model listing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backends.protocol import (
    Backend,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    ModelNotFound,
)
from gateway.auth import admit, usage_tokens
from gateway.registry import BackendRegistry
from gateway.sse import stream_response

T = TypeVar("T")

router = APIRouter()

# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


def _registry(request: Request) -> BackendRegistry:
    return request.app.state.registry


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it (and so the generation) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)  # never seen by the client; for logs
    finally:
        if not task.done():
            task.cancel()


def _load_header(backend: Backend) -> dict[str, str]:
    """The serving backend's load, piggybacked for routers upstream (Envoy ORCA form)."""
    return {"endpoint-load-metrics": backend.load().to_header()}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response) -> ChatCompletion | Response:
    ticket = await admit(request, body)  # 403 / 429 / 401 (revoked); reserves tokens
    try:
        backend = _registry(request).resolve(body.model)
        if body.stream:
            strip = ticket.usage_for(body)
            stream = ticket.meter(backend.chat_stream(body), strip)  # settles when the stream ends
            return await stream_response(stream, headers=_load_header(backend))
        result = await _unless_disconnected(request, backend.chat(body))
    except BaseException:
        ticket.settle(0)  # nothing was generated: refund the reservation
        raise
    ticket.settle(usage_tokens(result))
    response.headers.update(_load_header(backend))
    return result


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, response: Response) -> Completion | Response:
    ticket = await admit(request, body)
    try:
        backend = _registry(request).resolve(body.model)
        if body.stream:
            strip = ticket.usage_for(body)
            stream = ticket.meter(backend.completion_stream(body), strip)
            return await stream_response(stream, headers=_load_header(backend))
        result = await _unless_disconnected(request, backend.completion(body))
    except BaseException:
        ticket.settle(0)
        raise
    ticket.settle(usage_tokens(result))
    response.headers.update(_load_header(backend))
    return result


def _visible_cards(request: Request) -> list[ModelCard]:
    """The model cards this caller's key may use."""
    cards = _registry(request).model_cards()
    principal = request.scope.get("state", {}).get("principal")
    return cards if principal is None else [c for c in cards if principal.may_use(c.id)]


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    await admit(request, None)  # headers and the revocation check; takes nothing
    return ModelList(data=_visible_cards(request))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    await admit(request, None)
    for card in _visible_cards(request):
        if card.id == model_id:
            return card
    raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text: backend load under vLLM's names (see gateway/metrics.py)."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: every backend has started and reports healthy."""
    ready = _registry(request).healthy()
    return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)
