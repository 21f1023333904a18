"""Prometheus exposition: backend load under vLLM's metric names, so a router that can
read a vLLM server can read a turnout node the same way."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.registry import BackendRegistry


class BackendLoadCollector(Collector):
    """Reads every backend's LoadReport (and engine counters, where a backend keeps them)
    at scrape time: nothing to update on the request path."""

    def __init__(self, registry: BackendRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model_name", "backend"]
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1 (1 = full).", labels=labels)
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests being generated.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to run.", labels=labels)
        free = GaugeMetricFamily("turnout:kv_free_blocks", "Free KV-cache blocks.", labels=labels)
        block = GaugeMetricFamily("turnout:kv_block_size", "Tokens per KV-cache block.", labels=labels)
        cap = GaugeMetricFamily("turnout:max_running", "Requests the backend runs at once.", labels=labels)
        healthy = GaugeMetricFamily("turnout:backend_healthy", "1 when the backend reports healthy.", labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.", labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=labels)
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
            stats = getattr(backend, "stats", None)
            if callable(stats):
                counters = stats()
                if "prefix_cache_hits" in counters:
                    hits.add_metric(values, counters["prefix_cache_hits"])
                    queries.add_metric(values, counters.get("prefix_cache_queries", 0.0))
        yield from (kv, running, waiting, free, block, cap, healthy, hits, queries)


def build_metrics_registry(backends: BackendRegistry) -> CollectorRegistry:
    """A Prometheus registry of this app's own (one per app, so tests can run several)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(BackendLoadCollector(backends))
    return registry
