"""Prometheus exposition: backend load under vLLM's metric names, so a router that can
read a vLLM server can read a turnout node the same way."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from backends.protocol import ReportsStats
from gateway.outcome import RequestOutcome
from gateway.registry import BackendRegistry

if TYPE_CHECKING:
    from gateway.dispatch import Dispatcher


# Monotonic engine counters a backend's `stats()` may report, by their vLLM names.
ENGINE_COUNTERS = {
    "vllm:prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "vllm:prefix_cache_hits": "Prompt tokens served from the prefix cache.",
    "vllm:num_preemptions": "Sequences preempted (recomputed later) for lack of KV blocks.",
    "vllm:prompt_tokens": "Prompt tokens processed.",
    "vllm:generation_tokens": "Tokens generated.",
    "turnout:paged_steps": "Engine steps run.",
    "turnout:paged_sync_wait_seconds": "Seconds the engine waited for the device's sampled tokens (near 0 when the host bounds a step).",
    "turnout:paged_step_seconds": "Seconds the paged engine spent inside its steps.",
    "turnout:paged_prefill_tokens": "Prompt (and recomputed) tokens the paged engine computed in prefill chunks.",
    "turnout:paged_decode_tokens": "One-token decodes the paged engine computed (sequences x decode steps).",
    "turnout:paged_graph_steps": "Paged engine decode steps replayed from a CUDA graph.",
    "turnout:paged_idle_seconds": "Seconds the paged engine thread waited with nothing unfinished.",
    "turnout:paged_deliver_seconds": "Seconds the paged engine thread spent handing step outputs to sinks (a worker's encode and send).",
    "turnout:paged_drain_seconds": "Seconds the paged engine thread spent adding and aborting requests between steps.",
    "turnout:paged_loop_seconds": "Wall seconds since the paged engine thread started.",
    "turnout:requests_aborted": "Requests the gateway aborted in the engine worker (the client left) before they finished.",
}


class BackendLoadCollector(Collector):
    """Reads every backend's LoadReport (and engine counters, where a backend keeps them)
    at scrape time: nothing to update on the request path."""

    def __init__(self, registry: BackendRegistry, dispatcher: Callable[[], Dispatcher] | None = None) -> None:
        self.registry = registry
        self.dispatcher = dispatcher  # the current policy's: circuit states and in-flight counts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model_name", "backend"]
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1 (1 = full).", labels=labels)
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests being generated.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to run.", labels=labels)
        free = GaugeMetricFamily("turnout:kv_free_blocks", "Free KV-cache blocks.", labels=labels)
        block = GaugeMetricFamily("turnout:kv_block_size", "Tokens per KV-cache block.", labels=labels)
        cap = GaugeMetricFamily("turnout:max_running", "Requests the backend runs at once.", labels=labels)
        healthy = GaugeMetricFamily("turnout:backend_healthy", "1 when the backend reports healthy.", labels=labels)
        circuit = GaugeMetricFamily("turnout:backend_available", "1 unless the circuit breaker ejected the backend.", labels=labels)
        in_flight = GaugeMetricFamily("turnout:in_flight_requests", "Requests this gateway has in flight per backend.", labels=labels)
        dispatcher = self.dispatcher() if self.dispatcher is not None else None
        now = time.monotonic()
        counters = {name: CounterMetricFamily(name, help_, labels=labels) for name, help_ in ENGINE_COUNTERS.items()}
        for name, backend in self.registry.backends.items():
            model = backend.models()[0].id if self.registry.started else name
            values = [model, name]
            report = backend.load()
            kv.add_metric(values, report.kv_usage)
            running.add_metric(values, report.running)
            waiting.add_metric(values, report.waiting)
            free.add_metric(values, report.kv_free_blocks)
            block.add_metric(values, report.block_size)
            cap.add_metric(values, report.max_running)
            healthy.add_metric(values, 1.0 if report.healthy else 0.0)
            if dispatcher is not None:
                circuit.add_metric(values, 1.0 if dispatcher.board.available(name, now) else 0.0)
                in_flight.add_metric(values, dispatcher.in_flight(name))
            engine_stats = backend.stats() if isinstance(backend, ReportsStats) else {}  # engines' own counters
            for counter_name, family in counters.items():
                if counter_name in engine_stats:
                    family.add_metric(values, engine_stats[counter_name])
        yield from (kv, running, waiting, free, block, cap, healthy, circuit, in_flight, *counters.values())
        if dispatcher is not None:
            yield from _admission_families(dispatcher)


def _admission_families(dispatcher: Dispatcher) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Each admission queue's depth by priority, slots in use, and requests shed by reason."""
    depth = GaugeMetricFamily("turnout:admission_queue_depth", "Requests waiting for a slot.", labels=["model", "priority"])
    in_use = GaugeMetricFamily("turnout:admission_in_use", "Slots held by requests.", labels=["model"])
    shed = CounterMetricFamily("turnout:admission_shed", "Requests shed by admission, by reason.", labels=["model", "reason"])
    for alias, route in dispatcher.routes.items():
        if route.admission is None:
            continue
        for priority, n in route.admission.depth_by_priority().items():
            depth.add_metric([alias, priority], n)
        in_use.add_metric([alias], route.admission.in_use)
        for reason, n in route.admission.shed.items():
            shed.add_metric([alias, getattr(reason, "value", str(reason))], n)
    yield from (depth, in_use, shed)


def build_metrics_registry(
    backends: BackendRegistry, dispatcher: Callable[[], Dispatcher] | None = None
) -> tuple[CollectorRegistry, BackendLoadCollector]:
    """A Prometheus registry of this app's own (one per app, so tests can run several), and
    its collector of backend load."""
    registry = CollectorRegistry()  # no auto_describe: the collector reads live state only at scrape time
    load = BackendLoadCollector(backends, dispatcher)
    registry.register(load)
    return registry, load


def exposition(registry: CollectorRegistry, load: Collector) -> bytes:
    """The /metrics page. With several workers (PROMETHEUS_MULTIPROC_DIR set), counters and
    histograms are summed over every worker's files; backend load is this worker's view."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest(registry)
    from prometheus_client import multiprocess

    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)
    merged.register(load)
    return generate_latest(merged)


# Buckets for LLM latencies: first tokens in tens of ms to a minute, whole answers to ten
# minutes, per-token times from 1 ms to 1 s.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# Event-loop lag: a healthy loop wakes within a millisecond or two; 100 ms is a stall.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

MAX_CACHED_LABEL_SETS = 4096  # per metric; label values include clients' model names: bounded


class GatewayMetrics:
    """The gateway's own request metrics, observed once per request from its outcome."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "turnout_requests", "Requests by route, model, backend, variant and status.",
            ["route", "model", "backend", "variant", "status"], registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "turnout_request_duration_seconds", "End-to-end request latency.",
            ["route", "model", "backend", "variant"], buckets=E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "turnout_time_to_first_token_seconds", "Time to the first generated token.",
            ["model", "backend", "variant"], buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "turnout_time_per_output_token_seconds", "Time per output token after the first.",
            ["model", "backend", "variant"], buckets=TPOT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tokens = Counter(
            "turnout_tokens", "Tokens in (prompt) and out (completion).",
            ["model", "backend", "variant", "direction"], registry=registry,
        )  # fmt: skip
        self.rejections = Counter(
            "turnout_rejections", "Requests refused before reaching a backend, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.reloads = Counter(
            "turnout_policy_reloads", "Policy reloads by result.", ["result"], registry=registry
        )  # fmt: skip
        self.admission_wait = Histogram(
            "turnout_admission_wait_seconds", "Time admitted requests waited for a slot.",
            ["model"], buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.resumes = Counter(
            "turnout_stream_resumes", "Streams that went on, on another backend, after theirs failed (routes with resume).",
            ["model", "backend"], registry=registry,
        )  # fmt: skip
        self.loop_lag = Histogram(
            "turnout_event_loop_lag_seconds", "How late the event loop woke a task sleeping 100 ms (gateway.loop_lag).",
            buckets=LOOP_LAG_BUCKETS, registry=registry,
        )  # fmt: skip
        self._children: dict[Any, dict[tuple[str, ...], Any]] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once per label set: `labels()` validates,
        joins and hashes the values under a lock on every call, several times a request."""
        cache = self._children.setdefault(metric, {})
        child = cache.get(values)
        if child is None:
            if len(cache) >= MAX_CACHED_LABEL_SETS:
                cache.clear()
            child = cache[values] = metric.labels(*values)
        return child

    def observe_admission_wait(self, model: str, seconds: float) -> None:
        self._child(self.admission_wait, model).observe(seconds)

    def observe(self, outcome: RequestOutcome) -> None:
        """Count a finished request (latencies only for requests that produced tokens)."""
        backend, variant = outcome.backend or "none", outcome.variant or ""
        route, model = outcome.route, outcome.model
        self._child(self.requests, route, model, backend, variant, str(outcome.status)).inc()
        if outcome.e2e_s is not None:
            self._child(self.e2e, route, model, backend, variant).observe(outcome.e2e_s)
        if outcome.ttft_s is not None:
            self._child(self.ttft, model, backend, variant).observe(outcome.ttft_s)
        if outcome.tpot_s is not None:
            self._child(self.tpot, model, backend, variant).observe(outcome.tpot_s)
        if outcome.prompt_tokens:
            self._child(self.tokens, model, backend, variant, "in").inc(outcome.prompt_tokens)
        for left in outcome.resumed_from:
            self._child(self.resumes, model, left).inc()
        if outcome.completion_tokens:
            self._child(self.tokens, model, backend, variant, "out").inc(outcome.completion_tokens)
        if outcome.backend is None and outcome.status in (403, 429, 503):
            self.rejections.labels(outcome.error_code or str(outcome.status)).inc()
