"""The app factory: a FastAPI app serving one config's backends."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from opentelemetry.trace import TracerProvider

from gateway.auth import AuthMiddleware, Authenticator, install_auth_handlers
from gateway.errors import install_error_handlers
from gateway.fastpath import DirectRoutes
from gateway.keys import FileKeyStore, RedisKeyStore
from gateway.metrics import GatewayMetrics, build_metrics_registry
from gateway.middleware import RequestContextMiddleware
from gateway.ratelimit import InProcessStore, Limiter, LimiterMetrics, RedisStore, redis_client
from gateway.registry import BackendRegistry
from gateway.routes import GENERATION_PATHS, router
from gateway.runtime import GatewayRuntime
from gateway.tracing import Tracing
from policies.schema import AuthConfig, Config, parse_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.yaml"


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a policy file (the embedded default when path is None)."""
    path = Path(path) if path else DEFAULT_CONFIG
    return parse_config(path.read_text(), source=str(path))


def build_access(config: Config, metrics: LimiterMetrics) -> tuple[Authenticator, Limiter]:
    """The key store, authenticator and rate limiter a config asks for."""
    client = redis_client(config.redis.url, config.redis.timeout_ms) if config.redis else None
    store: FileKeyStore | RedisKeyStore | None = None
    if isinstance(config.auth, AuthConfig):
        if config.auth.store == "redis":
            store = RedisKeyStore(config.redis.url, config.redis.prefix, client)  # type: ignore[union-attr]
        else:
            store = FileKeyStore(config.auth.path)
    fail_mode = config.redis.fail_mode if config.redis else "open"
    limiter = Limiter(RedisStore(client) if client else InProcessStore(), fail_mode, metrics)
    return Authenticator(config, store, fail_open=fail_mode == "open"), limiter


def create_app(
    config: Config, *, config_path: str | Path | None = None, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """Build the gateway for `config`. Backends start in the app's lifespan. With
    `config_path`, the policy reloads from that file (on change, SIGHUP, /admin/reload).
    `tracer_provider`: tracing for tests; otherwise OpenTelemetry's OTEL_* variables decide."""
    registry = BackendRegistry(config)
    prometheus, load_collector = build_metrics_registry(registry, lambda: runtime.dispatcher)
    authenticator, limiter = build_access(config, LimiterMetrics(prometheus))
    runtime = GatewayRuntime(
        config,
        registry,
        GatewayMetrics(prometheus),
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
            await limiter.close()
            await registry.close()
            runtime.tracing.shutdown()

    app = FastAPI(title="turnout", version="0.1.0", lifespan=lifespan)
    app.state.runtime = runtime
    app.state.config = config
    app.state.metrics = prometheus
    app.state.load_collector = load_collector
    app.state.authenticator = authenticator
    app.state.limiter = limiter
    app.include_router(router)
    install_error_handlers(app)
    install_auth_handlers(app)
    # Innermost of the app's middlewares: the generation routes without FastAPI's routing
    # layer. The handlers dict is the app's own, read when the stack is built (first request).
    app.add_middleware(
        DirectRoutes, router=app.router, routes=router.routes, paths=GENERATION_PATHS, exception_handlers=app.exception_handlers
    )
    # Inside the request-id middleware (so 401s carry x-request-id); skipped when there is
    # nothing to check: `auth: none` and no limits.
    if authenticator.store is not None or authenticator.anonymous.buckets:
        app.add_middleware(AuthMiddleware, authenticator=authenticator)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=config.server.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    """The app of one worker of `turnout serve --workers N` (uvicorn imports it by name in
    each worker process): the config file comes from TURNOUT_CONFIG."""
    path = os.environ.get("TURNOUT_CONFIG") or None
    return create_app(load_config(path), config_path=path)
