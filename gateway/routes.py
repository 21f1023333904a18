"""The OpenAI routes (chat, completions, embeddings), health checks and model listing. The
other dialects' routes are in gateway/dialects/."""

from __future__ import annotations


from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from backends.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelCard, ModelList, ModelNotFound
from gateway.admin_access import admin_refusal
from gateway.auth import rate_limit
from gateway.body import parse_body
from gateway.errors import error_response
from gateway.generate import generate, unless_disconnected
from gateway.metrics import exposition
from gateway.registry import BackendRegistry

router = APIRouter()

# Served past FastAPI's routing layer by gateway.fastpath.DirectRoutes (same handlers, same
# errors): each takes only the Request and returns a Response.
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def _registry(request: Request) -> BackendRegistry:
    return request.app.state.runtime.registry


# The body is parsed here rather than declared as a parameter: FastAPI's dependency solving
# cost more than the whole validation (py-spy); gateway.body keeps FastAPI's errors.
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    body, raw = await parse_body(request, ChatCompletionRequest)
    return await unless_disconnected(request, generate("chat", body, raw, request))


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Response:
    body, raw = await parse_body(request, CompletionRequest)
    return await unless_disconnected(request, generate("completions", body, raw, request))


@router.post("/v1/embeddings", response_model=None)
async def embeddings(request: Request) -> Response:
    body, raw = await parse_body(request, EmbeddingRequest)
    return await unless_disconnected(request, generate("embeddings", body, raw, request))


def _visible_cards(request: Request) -> list[ModelCard]:
    """The model cards this caller's key may use."""
    cards = _registry(request).model_cards()
    principal = request.scope.get("state", {}).get("principal")
    return cards if principal is None else [c for c in cards if principal.may_use(c.id)]


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    await rate_limit(request, None)  # headers and the revocation check; takes nothing
    return ModelList(data=_visible_cards(request))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    await rate_limit(request, None)
    for card in _visible_cards(request):
        if card.id == model_id:
            return card
    raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text: backend load under vLLM's names (see gateway/metrics.py)."""
    page = exposition(request.app.state.metrics, request.app.state.load_collector)
    return Response(page, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: backends started, and every model has at least one backend up."""
    runtime = request.app.state.runtime
    ready = runtime.registry.started and runtime.snapshot.dispatcher.healthy()
    return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)


@router.post("/admin/reload")
async def admin_reload(request: Request) -> JSONResponse:
    """Re-read the policy file now (also on SIGHUP and when the file changes)."""
    refusal = admin_refusal(request)
    if refusal is not None:
        return refusal
    applied, message = await request.app.state.runtime.reload("admin API")
    if not applied:
        return error_response(400, f"The policy was rejected; the previous one keeps serving: {message}", code="invalid_policy")
    return JSONResponse({"status": "reloaded"})


@router.get("/admin/ps")
async def admin_ps(request: Request) -> JSONResponse:
    """The local models: loaded or not, their worker process, memory and expiry (`turnout ps`)."""
    refusal = admin_refusal(request, read_only=True)
    if refusal is not None:
        return refusal
    return JSONResponse({"models": _registry(request).residents()})


@router.get("/openapi.json", include_in_schema=False)
async def openapi_json(request: Request) -> JSONResponse:
    """The OpenAPI schema (gateway.openapi), with `server.api_docs: true` only, and behind the
    admin key (read-only: with no admin key set, loopback callers may read it). Off, it is the
    404 of any unknown URL. No HTML docs pages: they load their assets from a CDN."""
    if not request.app.state.runtime.snapshot.config.server.api_docs:
        raise HTTPException(status_code=404)
    refusal = admin_refusal(request, read_only=True)
    if refusal is not None:
        return refusal
    return JSONResponse(request.app.openapi())
