"""The backends a gateway serves, built from its config; kept across policy reloads."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import yaml
from pydantic import ValidationError

from backends.llamacpp.options import LlamaCppOptions
from backends.options import BackendOptions, describe
from backends.paged.options import EngineOptions
from backends.protocol import Backend, BackendError, ModelCard
from backends.remote.options import LiteLLMOptions, RemoteOptions
from backends.worker.backend import LocalModelBackend, WorkerBackend
from backends.worker.control import LocalModel
from backends.worker.messages import WorkerSpec
from backends.worker.shared import EngineHostClient, SharedWorkerBackend
from gateway.residency import ModelResidency
from policies.schema import BackendConfig, Config, ConfigError, problems

log = logging.getLogger("turnout.registry")

# Each backend kind's `options:` model (pydantic alone: checking a policy imports no engine).
OPTIONS_MODELS: dict[str, type[BackendOptions]] = {
    "llamacpp": LlamaCppOptions,
    "paged": EngineOptions,
    "remote": RemoteOptions,
    "litellm": LiteLLMOptions,
}


def backend_options(cfg: BackendConfig) -> BackendOptions:
    """`cfg.options` validated against its kind's model; pydantic's ValidationError names each field."""
    return OPTIONS_MODELS[cfg.kind].model_validate(cfg.options)


def check_options(config: Config, text: str | None = None, source: str | None = None) -> None:
    """Validate every backend's `options` against its kind's model. Problems raise one
    ConfigError in parse_config's form, `source:line: backends.N.options.FIELD: message`, the
    line looked up in the policy's `text` as parse_config looks up its own (without `text`
    and `source`, just `backends.N.options.FIELD: message`)."""
    raw = yaml.compose(text) if text is not None else None
    found = []
    for index, cfg in enumerate(config.backends):
        try:
            backend_options(cfg)
        except ValidationError as exc:
            found += problems(exc, raw, source, at=("backends", index, "options"))
    if found:
        raise ConfigError("\n".join(found))


def build_backend(cfg: BackendConfig, residency: ModelResidency | None = None, host: EngineHostClient | None = None) -> Backend:
    """Construct (but do not start) the backend a config entry describes. Bad options
    raise ConfigError naming the backend and the options. Local kinds become WorkerBackends:
    their model runs in an engine worker process, never in the serving process; with `host`
    (an HTTP process of `turnout serve --workers N`), SharedWorkerBackends, whose workers the
    engine host supervises."""
    try:
        options = backend_options(cfg)
    except ValidationError as exc:
        raise ConfigError(f"backend {cfg.name!r} ({cfg.kind}): {describe(exc, OPTIONS_MODELS[cfg.kind])}") from None
    try:
        if isinstance(options, (LlamaCppOptions, EngineOptions)):
            return _worker_backend(cfg, options, residency, host)
        if isinstance(options, RemoteOptions):
            from backends.remote.openai_http import RemoteBackend

            assert cfg.url is not None  # the schema requires it
            return RemoteBackend(
                name=cfg.name, model=cfg.model, url=cfg.url, model_id=cfg.model_id(), api_key_env=cfg.api_key_env, **options.model_dump()
            )
        if isinstance(options, LiteLLMOptions):
            from backends.remote.litellm_backend import LiteLLMBackend

            return LiteLLMBackend(  # model_dump keeps litellm's own parameters (the extra keys)
                name=cfg.name, model=cfg.model, model_id=cfg.model_id(), url=cfg.url, api_key_env=cfg.api_key_env, **options.model_dump()
            )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"backend {cfg.name!r} ({cfg.kind}): {exc}") from exc
    raise ConfigError(f"backend {cfg.name!r}: kind {cfg.kind!r} is not supported")


def _worker_backend(
    cfg: BackendConfig, options: LlamaCppOptions | EngineOptions, residency: ModelResidency | None, host: EngineHostClient | None
) -> LocalModelBackend:
    """Options were checked here, in the serving process, with the option models alone (no
    llama_cpp or torch import): a bad policy fails at `turnout check` and at reload. The
    worker gets them as written and validates them again where the engine is built."""
    if isinstance(options, LlamaCppOptions):
        window, max_running, block_size = options.n_ctx, options.instances, 0
    else:
        window, max_running, block_size = options.max_model_len, options.max_num_seqs, options.block_size
    path = _model_file(cfg.model)
    model = LocalModel(
        WorkerSpec(kind=cfg.kind, name=cfg.name, model=cfg.model, model_id=cfg.model_id(), options=dict(cfg.options), task=cfg.task),
        keep_alive_s=cfg.keep_alive_s(),
        preload=cfg.preload,
        context_window=window,
        max_running=max_running,
        block_size=block_size,
        model_path=str(path) if path else None,
    )
    if host is not None:
        return SharedWorkerBackend(model, host, lambda: residency.budget_bytes if residency is not None else None)
    return WorkerBackend(
        model.spec,
        keep_alive_s=model.keep_alive_s,
        preload=model.preload,
        context_window=window,
        max_running=max_running,
        block_size=block_size,
        model_path=path,
        before_load=residency.before_load if residency is not None else None,
    )


def _model_file(model: str) -> Path | None:
    """The model's file in the store, for memory estimates before it first loads."""
    from backends.models import resolve_model

    try:
        return resolve_model(model)
    except BackendError:
        return None


class BackendRegistry:
    """Owns the backends: builds, starts and closes them; on a reload, keeps the ones whose
    config did not change and starts only what is new."""

    def __init__(self, config: Config, host: EngineHostClient | None = None) -> None:
        self.config = config
        self.host = host  # the engine host's client, in an HTTP process of `turnout serve --workers N`
        self.residency = ModelResidency(config.server.model_memory_budget_gib, lambda: self.backends.values())
        check_options(config)  # every bad option at once, by field
        self.configs: dict[str, BackendConfig] = {b.name: b for b in config.backends}
        self.backends: dict[str, Backend] = {b.name: build_backend(b, self.residency, host) for b in config.backends}
        self.started = False

    async def start(self) -> None:
        """Start every backend (remote pools open; local models with `preload` load)."""
        await asyncio.gather(*(b.start() for b in self.backends.values()))
        self.started = True

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)
        if self.host is not None:
            await self.host.close()

    async def update(self, config: Config) -> list[Backend]:
        """Adopt a new config's backends. New or changed ones are built and started before
        anything switches (a failure leaves the registry as it was); returns the backends no
        longer used, for the caller to close once their requests are done. (Options were
        checked when the policy was read: gateway.policy_file.)"""
        fresh = {b.name: b for b in config.backends if self.configs.get(b.name) != b}
        built = {name: build_backend(cfg, self.residency, self.host) for name, cfg in fresh.items()}
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
        self.residency.set_budget(config.server.model_memory_budget_gib)
        return retired

    def model_cards(self) -> list[ModelCard]:
        """One card per model id clients can ask for, loaded or not."""
        cards = []
        for model_id, pool in self.config.aliases().items():
            card = self.backends[pool[0]].models()[0].model_copy(update={"id": model_id})
            cards.append(card)
        return cards

    def residents(self) -> list[dict[str, object]]:
        """What `turnout ps` shows: each local backend, loaded or not."""
        return [
            {
                "name": b.name,
                "model": b.model_id,
                "state": b.state,
                "pid": b.pid,
                "memory_bytes": b.memory_bytes() if b.loaded else 0,
                "expires_at": b.expires_at,
                "in_flight": b.in_flight,
                "restarts": b.restarts,
                "last_exit": b.last_exit,
                "load_error": b.load_error,
            }
            for b in self.residency.workers()
        ]
