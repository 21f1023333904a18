"""The backends a gateway serves, built from its config, and model id -> backend lookup."""

from __future__ import annotations

import asyncio
import logging

from backends.protocol import Backend, ModelCard, ModelNotFound
from policies.schema import BackendConfig, Config, ConfigError

log = logging.getLogger("turnout.registry")


def build_backend(cfg: BackendConfig) -> Backend:
    """Construct (but do not start) the backend a config entry describes. Bad options
    raise ConfigError naming the backend."""
    try:
        if cfg.kind == "llamacpp":
            from backends.llamacpp.runner import LlamaCppBackend

            return LlamaCppBackend(name=cfg.name, model=cfg.model, model_id=cfg.model_id(), **cfg.options)
        if cfg.kind == "paged":
            from backends.paged.backend import PagedBackend  # torch: imported only when used

            return PagedBackend(name=cfg.name, model=cfg.model, model_id=cfg.model_id(), **cfg.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"backend {cfg.name!r} ({cfg.kind}): {exc}") from exc
    raise ConfigError(f"backend {cfg.name!r}: kind {cfg.kind!r} is not supported")


class BackendRegistry:
    """Owns the backends: starts and closes them, and finds the one for a model id."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.backends: dict[str, Backend] = {b.name: build_backend(b) for b in config.backends}
        self.aliases = config.aliases()
        self.started = False

    async def start(self) -> None:
        """Start every backend (model loads run concurrently)."""
        await asyncio.gather(*(b.start() for b in self.backends.values()))
        self.started = True

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)

    def resolve(self, model: str) -> Backend:
        """The backend to serve `model` (the first of its pool; routing policies come later)."""
        pool = self.aliases.get(model)
        if not pool:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model")
        return self.backends[pool[0]]

    def model_cards(self) -> list[ModelCard]:
        """One card per model id clients can ask for."""
        cards = []
        for model_id, pool in self.aliases.items():
            card = self.backends[pool[0]].models()[0].model_copy(update={"id": model_id})
            cards.append(card)
        return cards

    def healthy(self) -> bool:
        return self.started and all(b.load().healthy for b in self.backends.values())
