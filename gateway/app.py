"""The app factory: a FastAPI app serving one config's backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from gateway.errors import install_error_handlers
from gateway.metrics import build_metrics_registry
from gateway.middleware import RequestContextMiddleware
from gateway.registry import BackendRegistry
from gateway.routes import router
from policies.schema import Config, parse_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.yaml"


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a policy file (the embedded default when path is None)."""
    path = Path(path) if path else DEFAULT_CONFIG
    return parse_config(path.read_text(), source=str(path))


def create_app(config: Config) -> FastAPI:
    """Build the gateway for `config`. Backends start in the app's lifespan."""
    registry = BackendRegistry(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        try:
            yield
        finally:
            await registry.close()

    app = FastAPI(title="turnout", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry
    app.state.config = config
    app.state.metrics = build_metrics_registry(registry)
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=config.server.max_body_bytes)
    return app
