"""The console's read-only views, built from the runtime's live objects at each poll: the
backends and their load, the routes, the policy serving now and its last reload, the
experiments with their sample counts. Plain dicts of JSON values; nothing here is cached
and nothing changes state (`CircuitBoard.states` reads the breakers without adding one)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from backends.protocol import Backend, LoadReport, PushesLoad
from gateway.console.sample_counts import VariantCount
from policies.circuit import CircuitState

if TYPE_CHECKING:
    from gateway.dispatch import Dispatcher
    from gateway.runtime import GatewayRuntime


def backend_status(healthy: bool, circuit: str, worker_state: str | None) -> str:
    """One word for a backend: `down` (dead or restarting worker, a model that failed to
    load, a report saying unhealthy, or an open circuit), `loading`, `idle` (a local model
    not loaded: it loads on the next request), `probing` (the circuit lets one request
    through to test it), else `up`."""
    if worker_state in ("restarting", "failed") or not healthy or circuit == CircuitState.OPEN.value:
        return "down"
    if worker_state == "loading":
        return "loading"
    if worker_state == "unloaded":
        return "idle"
    if circuit == CircuitState.HALF_OPEN.value:
        return "probing"
    return "up"


def _finite(x: float) -> float | None:
    """A report's number for JSON, which has no NaN (a scraped page may say NaN)."""
    return x if math.isfinite(x) else None


def _report(dispatcher: Dispatcher, name: str, backend: Backend) -> tuple[LoadReport, bool]:
    """The backend's load and whether it is fresh. A remote backend's comes from the load
    tracker (headers and scrapes; aged out after a few seconds), a local one's from the
    backend itself (always current)."""
    if isinstance(backend, PushesLoad):
        report = dispatcher.tracker.last_report(name)
        return (report, True) if report is not None else (backend.load(), False)
    return backend.load(), True


def backends_view(runtime: GatewayRuntime) -> list[dict[str, Any]]:
    """Each backend: kind, model, live load, circuit, in-flight count, its worker process
    (local backends) and one status word (`backend_status`)."""
    registry = runtime.registry
    dispatcher = runtime.snapshot.dispatcher
    workers = {w["name"]: w for w in registry.residents()}
    circuits = dispatcher.board.states(dispatcher.clock())
    out = []
    for name, backend in registry.backends.items():
        cfg = registry.configs.get(name)
        report, fresh = _report(dispatcher, name, backend)
        circuit = circuits.get(name, CircuitState.CLOSED).value
        worker = workers.get(name)
        out.append(
            {
                "name": name,
                "kind": cfg.kind if cfg else None,
                "model": cfg.model_id() if cfg else None,
                "url": cfg.url if cfg else None,
                "status": backend_status(report.healthy, circuit, worker["state"] if worker else None),  # type: ignore[arg-type]
                "healthy": report.healthy,
                "circuit": circuit,
                "fresh": fresh,
                "kv_usage": _finite(report.kv_usage),
                "kv_free_blocks": report.kv_free_blocks,
                "block_size": report.block_size,
                "running": report.running,
                "waiting": report.waiting,
                "max_running": report.max_running,
                "prefix_cache_hit_rate": _finite(report.prefix_cache_hit_rate),
                "in_flight": dispatcher.in_flight(name),
                "worker": worker,  # None for remote backends
            }
        )
    return out


def routes_view(runtime: GatewayRuntime) -> list[dict[str, Any]]:
    """Each model alias clients may ask for: its pool, strategy, fallbacks, retries,
    admission queue (depth and slots in use) and the experiment splitting it, if any."""
    snapshot = runtime.snapshot
    explicit = {r.model for r in snapshot.config.routes}
    out = []
    for alias, route in snapshot.dispatcher.routes.items():
        cfg = route.config
        admission = None
        if route.admission is not None and cfg.admission is not None:
            admission = {"limit": cfg.admission.limit, "in_use": route.admission.in_use, "queued": route.admission.depth}
        experiment = snapshot.dispatcher.experiments.get(alias)
        out.append(
            {
                "model": alias,
                "explicit": alias in explicit,  # False: a backend's own model id, default route
                "backends": list(cfg.backends),
                "strategy": cfg.strategy,
                "strategy_params": cfg.strategy_params,
                "fallbacks": list(cfg.fallbacks),
                "max_retries": cfg.retries.max_retries,
                "max_tokens": cfg.max_tokens,
                "admission": admission,
                "experiment": experiment.name if experiment else None,
            }
        )
    return out


def policy_view(runtime: GatewayRuntime) -> dict[str, Any]:
    """The policy serving now (a digest of it, how many policies this process has applied,
    since when) and the last reload attempt, with its error text when it was rejected."""
    config = runtime.snapshot.config
    return {
        "version": runtime.policy_version,
        "generation": runtime.policy_generation,
        "applied_at": runtime.policy_applied_at,
        "path": str(runtime.config_path) if runtime.config_path else None,
        "watch_config": config.server.watch_config and runtime.config_path is not None,
        "last_reload": asdict(runtime.last_reload) if runtime.last_reload else None,
        "auth": config.auth if isinstance(config.auth, str) else config.auth.store,  # none | file | redis
        "sample_log": str(runtime.snapshot.sample_log),
    }


def experiments_view(runtime: GatewayRuntime, counts: dict[tuple[str, str], VariantCount]) -> list[dict[str, Any]]:
    """Each experiment of the policy with its variants' live sample counts from the log."""
    out = []
    for exp in runtime.snapshot.config.experiments:
        variants = []
        for v in exp.variants:
            count = counts.get((exp.name, v.name), VariantCount())
            variants.append(
                {
                    "name": v.name,
                    "backends": list(v.backends),
                    "weight": v.live_weight(),
                    "shadow": v.shadow,
                    "samples": count.samples,
                    "errors": count.errors,
                }
            )
        out.append(
            {
                "name": exp.name,
                "model": exp.model,
                "enabled": exp.enabled,
                "sticky_by": exp.sticky_by,
                "shadow_sample": exp.shadow_sample,
                "samples": sum(v["samples"] for v in variants),
                "variants": variants,
            }
        )
    return out


def overview(runtime: GatewayRuntime, counts: dict[tuple[str, str], VariantCount]) -> dict[str, Any]:
    """Everything the console refreshes each second, in one answer."""
    return {
        "now": time.time(),
        "policy": policy_view(runtime),
        "backends": backends_view(runtime),
        "routes": routes_view(runtime),
        "experiments": experiments_view(runtime, counts),
    }
