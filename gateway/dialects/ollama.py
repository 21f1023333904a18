"""Ollama's native API (docs/api.md, "Ollama's API"), so that any Ollama tool can point at
turnout: /api/chat, /api/generate, /api/embed, /api/embeddings translated onto the contract
(gateway.dialects.ollama_translate) and answered in Ollama's records
(gateway.dialects.ollama_stream) through the one request path, so auth, limits, routing,
admission, A/B, metrics, traces and the access log apply; /api/tags, /api/ps, /api/show from
the routes and their backends (gateway.dialects.ollama_models); /api/version; and /api/pull,
mapped onto `turnout pull`, for the admin key only.

Models are the gateway's routes; `name:latest` names a route `name` without a tag.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from backends import models as store
from backends.protocol import APIError, ModelNotFound, parse_keep_alive
from backends.worker.backend import LocalModelBackend
from gateway.admin_access import admin_refusal
from gateway.auth import rate_limit
from gateway.body import parse_body
from gateway.dialects.ollama_models import LATEST, ModelFacts, facts, tagged
from gateway.dialects.ollama_stream import NDJSON, OllamaDialect, Shape, Timer, rfc3339
from gateway.dialects.ollama_translate import chat_request, embed_request, generate_request, load_request
from gateway.dialects.ollama_types import (
    ChatRequest,
    EmbeddingAnswer,
    EmbeddingsRequest,
    EmbedAnswer,
    EmbedRequest,
    ErrorRecord,
    GenerateRequest,
    Progress,
    PullRequest,
    Running,
    RunningModel,
    ShowAnswer,
    ShowRequest,
    TagModel,
    Tags,
    Version,
)
from gateway.errors import error_response
from gateway.generate import generate, unless_disconnected
from gateway.snapshot import Snapshot

router = APIRouter()

# The Ollama release whose API this dialect speaks: the last before `think` (0.9.0), which
# turnout refuses; it has streamed tool calls (0.8.0), structured outputs (0.5.0) and
# /api/embed (0.3.0). Clients that check the server's version accept it.
OLLAMA_VERSION = "0.8.0"


# -- models --------------------------------------------------------------------------------------


def _snapshot(request: Request) -> Snapshot:
    return request.scope.get("state", {}).get("snapshot") or request.app.state.runtime.snapshot


def _visible(request: Request, alias: str) -> bool:
    principal = request.scope.get("state", {}).get("principal")
    return principal is None or principal.may_use(alias)


def resolve(request: Request, name: str) -> str:
    """The route a model name asks for: the name itself, or without its `:latest` tag.
    Unknown (or not this key's): Ollama's 404."""
    routes = _snapshot(request).dispatcher.routes
    principal = request.scope["state"].get("principal")
    for alias in (name, name.removesuffix(LATEST)):
        if alias in routes and (principal is None or principal.may_use(alias)):
            return alias
    raise ModelNotFound(f"model '{name}' not found", param="model")


def _pool(request: Request, alias: str) -> list[Any]:
    snapshot = _snapshot(request)
    return [snapshot.dispatcher.backends[n] for n in snapshot.dispatcher.routes[alias].config.backends]


async def _facts(request: Request, alias: str, *, verbose: bool = False) -> ModelFacts:
    """The facts of a route's model, from its first backend (file reads in a thread)."""
    first = _snapshot(request).dispatcher.routes[alias].config.backends[0]
    cfg = request.app.state.runtime.registry.configs[first]
    return await asyncio.to_thread(facts, cfg, verbose=verbose)


def _capabilities(request: Request, alias: str) -> list[str]:
    dispatcher = _snapshot(request).dispatcher
    pool = dispatcher.routes[alias].config.backends
    found = [] if all(n in dispatcher.embed_only for n in pool) else ["completion", "tools"]
    if any(n in dispatcher.embedders for n in pool):
        found.append("embedding")
    return found


# -- generation ----------------------------------------------------------------------------------


async def _serve_load(request: Request, raw: bytes, alias: str, shown: str, shape: Shape, keep_alive: Any, timer: Timer) -> Response:
    """An empty prompt or message list: load the model (a one-token completion through the
    one request path), or with keep_alive 0 unload it; answered done with done_reason
    "load" / "unload". A local model that is not loaded needs nothing to unload."""
    unload = keep_alive is not None and parse_keep_alive(keep_alive) == 0
    dialect = OllamaDialect(f"ollama.{shape}", shape, shown, timer, load="unload" if unload else "load")
    pool = _pool(request, alias)
    if unload and all(isinstance(b, LocalModelBackend) and not b.loaded for b in pool):
        return Response(dialect.answer(None), media_type="application/json")
    return await unless_disconnected(request, generate("completions", load_request(alias, keep_alive), raw, request, dialect))


@router.post("/api/chat", response_model=None)
async def chat(request: Request) -> Response:
    """Ollama's chat: a chat completion, streamed as NDJSON unless `stream` is false."""
    timer = Timer()
    body, raw = await parse_body(request, ChatRequest)
    alias = resolve(request, body.model)
    timer.watch(_pool(request, alias))
    try:
        if not body.messages:
            return await _serve_load(request, raw, alias, body.model, "chat", body.keep_alive, timer)
        dialect = OllamaDialect("ollama.chat", "chat", body.model, timer, streamed=body.streamed())
        return await unless_disconnected(request, generate("chat", chat_request(body, alias), raw, request, dialect))
    finally:
        timer.settle()


@router.post("/api/generate", response_model=None)
async def generate_text(request: Request) -> Response:
    """Ollama's generate: a chat of one user message (plus `system`), or with `raw` a text
    completion of the prompt as is."""
    timer = Timer()
    body, raw = await parse_body(request, GenerateRequest)
    alias = resolve(request, body.model)
    timer.watch(_pool(request, alias))
    try:
        if not body.prompt:
            return await _serve_load(request, raw, alias, body.model, "generate", body.keep_alive, timer)
        contract = generate_request(body, alias)
        kind = "completions" if body.raw else "chat"
        dialect = OllamaDialect("ollama.generate", "generate", body.model, timer, streamed=body.streamed())
        return await unless_disconnected(request, generate(kind, contract, raw, request, dialect))
    finally:
        timer.settle()


@router.post("/api/embed", response_model=None)
async def embed(request: Request) -> Response:
    """Ollama's embed: one input or a list, through the contract's embeddings. An empty
    input embeds nothing."""
    timer = Timer()
    body, raw = await parse_body(request, EmbedRequest)
    alias = resolve(request, body.model)
    if body.input in ("", []):
        return Response(EmbedAnswer(model=body.model, embeddings=[]).line(), media_type="application/json")
    timer.watch(_pool(request, alias))
    try:
        dialect = OllamaDialect("ollama.embed", "embed", body.model, timer)
        return await unless_disconnected(request, generate("embeddings", embed_request(body, alias), raw, request, dialect))
    finally:
        timer.settle()


@router.post("/api/embeddings", response_model=None)
async def embeddings(request: Request) -> Response:
    """The legacy one-prompt embedding: `{"embedding": [...]}`."""
    timer = Timer()
    body, raw = await parse_body(request, EmbeddingsRequest)
    alias = resolve(request, body.model)
    if not body.prompt:
        return Response(EmbeddingAnswer(embedding=[]).line(), media_type="application/json")
    try:
        dialect = OllamaDialect("ollama.embeddings", "embeddings", body.model, timer)
        return await unless_disconnected(request, generate("embeddings", embed_request(body, alias), raw, request, dialect))
    finally:
        timer.settle()


# -- model pages ---------------------------------------------------------------------------------


@router.get("/api/tags")
async def tags(request: Request) -> Response:
    """The models this key may use, as Ollama lists its local ones."""
    await rate_limit(request, None)  # the headers and the revocation check; takes nothing
    listed = []
    for alias in _snapshot(request).dispatcher.routes:
        if not _visible(request, alias):
            continue
        known = await _facts(request, alias)
        listed.append(
            TagModel(
                name=tagged(alias), model=tagged(alias), modified_at=rfc3339(known.modified or None), size=known.size, digest=known.digest, details=known.details
            )
        )
    return Response(Tags(models=listed).line(), media_type="application/json")


@router.get("/api/ps")
async def ps(request: Request) -> Response:
    """The local models loaded now, by each route that serves them."""
    await rate_limit(request, None)
    registry = request.app.state.runtime.registry
    loaded = {r["name"]: r for r in registry.residents() if r["state"] == "ready"}
    running = []
    for alias, route in _snapshot(request).dispatcher.routes.items():
        if not _visible(request, alias):
            continue
        for name in route.config.backends:
            resident = loaded.get(name)
            if resident is None:
                continue
            known = await _facts(request, alias)
            expires = resident["expires_at"]
            running.append(
                RunningModel(
                    name=tagged(alias),
                    model=tagged(alias),
                    size=int(resident["memory_bytes"]),
                    digest=known.digest,
                    details=known.details,
                    expires_at=rfc3339(expires) if expires else None,  # none: in use, or kept for good
                    context_length=registry.backends[name].context_window,
                )
            )
    return Response(Running(models=running).line(), media_type="application/json")


@router.post("/api/show")
async def show(request: Request) -> Response:
    """A model's details, GGUF metadata, chat template and capabilities."""
    body, _ = await parse_body(request, ShowRequest)
    await rate_limit(request, None)
    alias = resolve(request, body.model_name())
    if not _visible(request, alias):
        raise ModelNotFound(f"model '{body.model_name()}' not found", param="model")
    known = await _facts(request, alias, verbose=body.verbose)
    context = known.context_length or _pool(request, alias)[0].models()[0].max_model_len
    answer = ShowAnswer(
        modelfile=f"# turnout serves this model from its route {alias!r}; it has no Modelfile.\nFROM {tagged(alias)}\n",
        parameters=f"num_ctx {context}" if context else "",
        template=known.template,  # the GGUF's chat template: Jinja, not Ollama's Go template
        details=known.details,
        model_info=known.info,
        capabilities=_capabilities(request, alias),
        modified_at=rfc3339(known.modified or None),  # a remote model has no file: now
        license=known.license,
    )
    return Response(answer.line(), media_type="application/json")


@router.get("/api/version")
async def version() -> Response:
    """The Ollama API version served (public, as in Ollama)."""
    return Response(Version(version=OLLAMA_VERSION).line(), media_type="application/json")


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def running() -> PlainTextResponse:
    """What Ollama answers at its root: clients (the ollama CLI, Open WebUI) check it."""
    return PlainTextResponse("Ollama is running")


# -- pull ----------------------------------------------------------------------------------------


@router.post("/api/pull", response_model=None)
async def pull(request: Request) -> Response:
    """`turnout pull NAME` for the admin key: Ollama's progress records, streamed unless
    `stream` is false, ending with {"status": "success"}. The pull runs in a thread; a
    client that leaves does not stop it (the download completes into the store)."""
    refusal = admin_refusal(request, dialect="ollama")
    if refusal is not None:
        return refusal
    body, _ = await parse_body(request, PullRequest)
    name = body.model_name().removesuffix(LATEST)
    if not (name.startswith("hf:") or name in store.KNOWN_MODELS):
        known = ", ".join(store.KNOWN_MODELS)
        raise ModelNotFound(f"model '{body.model_name()}' cannot be pulled: turnout pulls {known} or hf:ORG/REPO/FILE", param="model")
    if body.stream is False:
        try:
            await asyncio.to_thread(store.pull, name)
        except APIError:
            raise
        except Exception as exc:  # pip or the network failed: say so, in Ollama's shape
            return error_response(500, f"pull of '{name}' failed: {exc}", dialect="ollama")
        return Response(Progress(status="success").line(), media_type="application/json")

    async def progress() -> AsyncIterator[bytes]:
        yield Progress(status="pulling manifest").line()
        try:
            path = await asyncio.to_thread(store.pull, name)
        except Exception as exc:  # the 200 went out: Ollama's in-band error
            yield ErrorRecord(error=f"pull of '{name}' failed: {exc}").line()
            return
        size = path.stat().st_size
        yield Progress(status=f"pulling {path.name}", digest=path.name, total=size, completed=size).line()
        yield Progress(status="success").line()

    return StreamingResponse(progress(), media_type=NDJSON)
