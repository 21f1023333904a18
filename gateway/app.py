"""The app factory: a FastAPI app serving one config's backends."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from opentelemetry.trace import TracerProvider

from backends.worker.shared import EngineHostClient
from gateway import console
from gateway.auth import AuthMiddleware
from gateway.dialects import anthropic, ollama, responses
from gateway.errors import install_error_handlers
from gateway.fastpath import DirectRoutes
from gateway.metrics import GatewayMetrics, build_metrics_registry
from gateway.middleware import RequestContextMiddleware
from gateway.openapi import openapi_schema
from gateway.ratelimit import LimiterMetrics
from gateway.policy_file import load_config
from gateway.registry import BackendRegistry
from gateway.routes import GENERATION_PATHS, router
from gateway.runtime import GatewayRuntime
from gateway.tracing import Tracing
from policies.schema import Config

def create_app(
    config: Config,
    *,
    config_path: str | Path | None = None,
    tracer_provider: TracerProvider | None = None,
    engine_host: EngineHostClient | None = None,
) -> FastAPI:
    """Build the gateway for `config`. Backends start in the app's lifespan. With
    `config_path`, the policy reloads from that file (on change, SIGHUP, /admin/reload).
    `tracer_provider`: tracing for tests; otherwise OpenTelemetry's OTEL_* variables decide.
    `engine_host`: local models are shared through it (an HTTP process of `--workers N`)."""
    registry = BackendRegistry(config, engine_host)
    prometheus, load_collector = build_metrics_registry(registry, lambda: runtime.snapshot.dispatcher)
    runtime = GatewayRuntime(
        config,
        registry,
        GatewayMetrics(prometheus),
        LimiterMetrics(prometheus),
        Tracing(tracer_provider),
        config_path=Path(config_path) if config_path else None,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        runtime.start_background()
        try:
            yield
        finally:
            await runtime.stop_background()
            await registry.close()
            runtime.tracing.shutdown()

    # No docs pages and no schema route of FastAPI's own: GET /openapi.json is gateway.routes'
    # (off unless server.api_docs, behind the admin key), its schema gateway.openapi's. And no
    # trailing-slash redirects: `POST /v1/chat/completions/` is a 404 with OpenAI's error body,
    # not a 307 with an empty one that clients do not follow for a POST.
    app = FastAPI(
        title="turnout",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.state.runtime = runtime  # the one handle on live state; its snapshot holds the policy
    app.state.metrics = prometheus
    app.state.load_collector = load_collector
    app.include_router(router)
    app.include_router(console.router)  # /console and /admin/console/ (gateway/console)
    for dialect in (anthropic, ollama, responses):  # documented in docs/api.md; the schema is OpenAI's API
        app.include_router(dialect.router, include_in_schema=False)
    install_error_handlers(app)
    # Innermost of the app's middlewares: the generation routes without FastAPI's routing
    # layer. The handlers dict is the app's own, read when the stack is built (first request).
    app.add_middleware(
        DirectRoutes, router=app.router, routes=router.routes, paths=GENERATION_PATHS, exception_handlers=app.exception_handlers
    )
    # Inside the request-id middleware (so 401s carry x-request-id). Both read the current
    # snapshot per request, so a reload changes auth, limits and the body cap at once.
    app.add_middleware(AuthMiddleware, current=lambda: runtime.snapshot)
    # Outermost: the request id, the body cap and the client's address (X-Forwarded-For from
    # server.trusted_proxies only; uvicorn's own proxy headers are off, gateway.cli).
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=lambda: runtime.snapshot.config.server.max_body_bytes,
        trusted_proxies=lambda: runtime.snapshot.config.server.trusted_proxies,
    )
    return app


def app_from_env() -> FastAPI:
    """The app of one HTTP process of `turnout serve --workers N` (uvicorn imports it by name
    in each process): the config file comes from TURNOUT_CONFIG, the engine host's address
    and pid from TURNOUT_ENGINE_HOST. A spawned process runs no `main`, so its logging is set
    up here, as the CLI's."""
    from gateway.cli import configure_logging

    configure_logging()
    path = os.environ.get("TURNOUT_CONFIG") or None
    host = None
    if os.environ.get("TURNOUT_ENGINE_HOST"):
        address, _, pid = os.environ["TURNOUT_ENGINE_HOST"].rpartition("#")
        host = EngineHostClient(address, int(pid))
    return create_app(load_config(path), config_path=path, engine_host=host)
