"""gateway.metrics: a backend's engine counters (its `stats()`) on the /metrics page."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from backends.protocol import LoadReport
from gateway.metrics import ENGINE_COUNTERS, build_metrics_registry, exposition

PROFILE_NAMES = [
    "turnout:paged_step_seconds", "turnout:paged_prefill_tokens", "turnout:paged_decode_tokens", "turnout:paged_graph_steps",
    "turnout:paged_idle_seconds", "turnout:paged_deliver_seconds", "turnout:paged_drain_seconds", "turnout:paged_loop_seconds",
]  # fmt: skip


class StatsBackend:
    """A backend with engine counters of its own (as PagedBackend, or a worker's client)."""

    def __init__(self, stats: dict[str, float]) -> None:
        self._stats = stats

    def load(self) -> LoadReport:
        return LoadReport(kv_usage=0.25, kv_free_blocks=10, block_size=16, running=1, waiting=0, max_running=4)

    def stats(self) -> dict[str, float]:
        return dict(self._stats)


def samples(stats: dict[str, float]) -> dict[tuple[str, str], float]:
    """(sample name, backend label) -> value on the /metrics page of one backend, "gpu", with `stats`."""
    backends = SimpleNamespace(backends={"gpu": StatsBackend(stats)}, started=False)
    registry, load = build_metrics_registry(backends)  # type: ignore[arg-type]
    text = exposition(registry, load).decode()
    return {(s.name, s.labels.get("backend", "")): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_engine_profile_counters_are_exported_when_a_backend_reports_them() -> None:
    assert set(PROFILE_NAMES) <= set(ENGINE_COUNTERS)
    got = samples({"turnout:paged_step_seconds": 12.5, "turnout:paged_deliver_seconds": 0.75, "turnout:paged_steps": 100.0})
    assert got[("turnout:paged_step_seconds_total", "gpu")] == 12.5
    assert got[("turnout:paged_deliver_seconds_total", "gpu")] == 0.75
    assert got[("turnout:paged_steps_total", "gpu")] == 100.0
    # Counters the backend does not report are left out, not exported as 0.
    assert ("turnout:paged_idle_seconds_total", "gpu") not in got


def test_every_engine_counter_reaches_the_page() -> None:
    got = samples({name: float(i + 1) for i, name in enumerate(ENGINE_COUNTERS)})
    for i, name in enumerate(ENGINE_COUNTERS):
        assert got[(name + "_total", "gpu")] == float(i + 1)
