"""The backends a gateway serves, built from its config; kept across policy reloads."""

from __future__ import annotations

import asyncio
import logging

from backends.protocol import Backend, ModelCard
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
        if cfg.kind == "remote":
            from backends.remote.openai_http import RemoteBackend

            assert cfg.url is not None  # the schema requires it
            return RemoteBackend(
                name=cfg.name, model=cfg.model, url=cfg.url, model_id=cfg.model_id(), api_key_env=cfg.api_key_env, **cfg.options
            )
        if cfg.kind == "litellm":
            from backends.remote.litellm_backend import LiteLLMBackend

            return LiteLLMBackend(
                name=cfg.name, model=cfg.model, model_id=cfg.model_id(), url=cfg.url, api_key_env=cfg.api_key_env, **cfg.options
            )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"backend {cfg.name!r} ({cfg.kind}): {exc}") from exc
    raise ConfigError(f"backend {cfg.name!r}: kind {cfg.kind!r} is not supported")


class BackendRegistry:
    """Owns the backends: builds, starts and closes them; on a reload, keeps the ones whose
    config did not change and starts only what is new."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.configs: dict[str, BackendConfig] = {b.name: b for b in config.backends}
        self.backends: dict[str, Backend] = {b.name: build_backend(b) for b in config.backends}
        self.started = False

    async def start(self) -> None:
        """Start every backend (model loads run concurrently)."""
        await asyncio.gather(*(b.start() for b in self.backends.values()))
        self.started = True

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)

    async def update(self, config: Config) -> list[Backend]:
        """Adopt a new config's backends. New or changed ones are built and started before
        anything switches (a failure leaves the registry as it was); returns the backends no
        longer used, for the caller to close once their requests are done."""
        fresh = {b.name: b for b in config.backends if self.configs.get(b.name) != b}
        built = {name: build_backend(cfg) for name, cfg in fresh.items()}
        try:
            await asyncio.gather(*(b.start() for b in built.values()))
        except BaseException:
            await asyncio.gather(*(b.close() for b in built.values()), return_exceptions=True)
            raise
        wanted = {b.name for b in config.backends}
        retired = [b for name, b in self.backends.items() if name not in wanted or name in built]
        self.backends = {**{n: b for n, b in self.backends.items() if n in wanted}, **built}
        self.configs = {b.name: b for b in config.backends}
        self.config = config
        return retired

    def model_cards(self) -> list[ModelCard]:
        """One card per model id clients can ask for."""
        cards = []
        for model_id, pool in self.config.aliases().items():
            card = self.backends[pool[0]].models()[0].model_copy(update={"id": model_id})
            cards.append(card)
        return cards
