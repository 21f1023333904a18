"""What the router knows of each backend's load, as `ReplicaState`s for the strategies.

Three sources, freshest first:

1. The gateway's own bookkeeping: requests in flight per backend and the KV blocks they
   reserve (prompt + max_tokens), counted from the moment a request is sent.
2. The `endpoint-load-metrics` header (Envoy ORCA text) on every turnout node's response.
3. A scrape of each remote backend's `/metrics` every 500 ms (turnout nodes, and real vLLM
   servers by vLLM's metric names).

A report describes the backend at the moment it was made; requests this gateway sent after
it are not in it. The tracker bridges that gap: estimated free blocks = reported free -
blocks reserved by requests sent since the report + prompt blocks of requests that finished
since the report but were sent before it (blocks the report counted as taken and the engine
has since released to its cache). A report older than `stale_after_s` ages out: the
backend's KV state is unknown (`ReplicaState.load` is None) and strategies fall back to
in-flight counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from backends.protocol import LoadReport
from policies.routing import ReplicaState

log = logging.getLogger("turnout.load_tracker")

SCRAPE_INTERVAL_S = 0.5
STALE_AFTER_S = 5.0


@dataclass
class Reservation:
    """One in-flight request's claim on a backend (a handle for `release`)."""

    backend: str
    id: int
    prompt_blocks: int
    total_blocks: int  # prompt + max_tokens
    sent_at: float


@dataclass
class _Backend:
    report: LoadReport | None = None
    received_at: float | None = None  # tracker clock when the report arrived
    open: dict[int, Reservation] = field(default_factory=dict)
    # Prompt blocks of requests sent before the current report that finished after it.
    freed_since_report: int = 0
    finished_since_report: int = 0  # of those requests
    # Prefix-cache counters from the last scrape, for a hit rate over the scrape interval.
    prefix_counters: tuple[float, float] | None = None
    scrape_errors: int = 0


class LoadTracker:
    """Per-backend load, from reports and the gateway's own reservations.

    `clock` is monotonic seconds (injected: tests and the simulator drive it). Reports'
    own `timestamp` fields are wall-clock times from other machines; staleness is judged by
    when the report *arrived*, on this clock.
    """

    def __init__(
        self,
        *,
        stale_after_s: float = STALE_AFTER_S,
        default_block_size: int = 16,
        default_max_running: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.default_block_size = default_block_size
        # For servers that do not export how many requests they run at once (vLLM: its
        # max_num_seqs, 256 by default in most versions, is not a metric).
        self.default_max_running = default_max_running
        self.clock = clock
        self._backends: dict[str, _Backend] = {}
        self._ids = itertools.count()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None

    def _get(self, backend: str) -> _Backend:
        return self._backends.setdefault(backend, _Backend())

    # -- reports ---------------------------------------------------------------------------

    def observe(self, backend: str, report: LoadReport) -> None:
        """A fresh report from any source. It already counts every request sent before now."""
        b = self._get(backend)
        now = self.clock()
        b.report = report
        b.received_at = now
        b.freed_since_report = 0
        b.finished_since_report = 0
        for r in b.open.values():  # the report has seen these: they are no longer "since"
            r.sent_at = min(r.sent_at, now - 1e-9)

    def observe_header(self, backend: str, header_value: str | None) -> LoadReport | None:
        """The `endpoint-load-metrics` header of a backend's response (ignored if absent or
        malformed: a bad header must never fail the request that carried it)."""
        if not header_value:
            return None
        try:
            report = LoadReport.from_header(header_value)
        except (ValueError, TypeError) as exc:
            log.debug("backend %s: unparseable endpoint-load-metrics %r: %s", backend, header_value, exc)
            return None
        self.observe(backend, report)
        return report

    def observe_metrics_text(self, backend: str, text: str, labels: Mapping[str, str] | None = None) -> LoadReport | None:
        """A `/metrics` scrape body (Prometheus text). Returns the report, or None when the
        text has none of the load metrics (a server we cannot route on)."""
        previous = self._get(backend).prefix_counters
        report, counters = parse_load_metrics(text, labels, previous, default_max_running=self.default_max_running)
        if report is None:
            return None
        self._get(backend).prefix_counters = counters
        self.observe(backend, report)
        return report

    def last_report(self, backend: str) -> LoadReport | None:
        """The last report if it is fresh, else None (aged out)."""
        b = self._backends.get(backend)
        if b is None or b.report is None or b.received_at is None:
            return None
        if self.clock() - b.received_at > self.stale_after_s:
            return None
        return b.report

    # -- the gateway's own bookkeeping ---------------------------------------------------

    def reserve(self, backend: str, prompt_tokens: int, max_tokens: int = 0) -> Reservation:
        """A request is being sent to `backend`: count it, and its KV blocks, until `release`."""
        b = self._get(backend)
        bs = b.report.block_size if b.report is not None and b.report.block_size > 0 else self.default_block_size
        prompt_blocks = -(-max(1, prompt_tokens) // bs)
        total_blocks = -(-(max(1, prompt_tokens) + max(0, max_tokens)) // bs)
        r = Reservation(backend, next(self._ids), prompt_blocks, total_blocks, self.clock())
        b.open[r.id] = r
        return r

    def release(self, handle: Reservation) -> None:
        """The request finished (or failed, or was cancelled). Idempotent."""
        b = self._get(handle.backend)
        if b.open.pop(handle.id, None) is None:
            return
        if b.received_at is not None and handle.sent_at < b.received_at:
            # The report counted its blocks as taken; the engine has released them since.
            b.freed_since_report += handle.prompt_blocks
            b.finished_since_report += 1

    def in_flight(self, backend: str) -> int:
        return len(self._get(backend).open)

    # -- what strategies see -------------------------------------------------------------

    def estimate(self, backend: str) -> LoadReport | None:
        """The last fresh report, bridged with what this gateway did since (None: unknown)."""
        report = self.last_report(backend)
        if report is None:
            return None
        b = self._backends[backend]
        assert b.received_at is not None
        since = [r for r in b.open.values() if r.sent_at >= b.received_at]
        reserved = sum(r.total_blocks for r in since)
        free = report.kv_free_blocks
        usage = report.kv_usage
        if report.block_size > 0:
            # total blocks from the report: usage = 1 - free / total (as the engine computes it)
            capacity = report.kv_free_blocks / (1.0 - report.kv_usage) if report.kv_usage < 1.0 else None
            free = report.kv_free_blocks - reserved + b.freed_since_report
            if capacity:
                free = min(free, int(round(capacity)))
                usage = min(1.0, max(0.0, 1.0 - max(free, 0) / capacity))
            free = max(0, free)
        # Finished requests leave running and the waiting move up into their slots; new ones
        # run if a slot is free and nobody waits, else they wait.
        finished = b.finished_since_report
        running = max(0, report.running - finished)
        moved = min(report.waiting, report.running - running)
        running += moved
        waiting = report.waiting - moved
        new = len(since)
        starts = min(new, max(0, report.max_running - running)) if waiting == 0 else 0
        return dataclasses.replace(report, kv_free_blocks=free, kv_usage=usage, running=running + starts, waiting=waiting + new - starts)

    def replica_state(self, backend: str, *, weight: float = 1.0, available: bool = True) -> ReplicaState:
        """One backend as a strategy sees it."""
        return ReplicaState(backend, weight=weight, in_flight=self.in_flight(backend), load=self.estimate(backend), available=available)

    def replica_states(self, backends: Iterable[str], weights: Mapping[str, float] | None = None, available: Mapping[str, bool] | None = None) -> list[ReplicaState]:
        """A pool's replicas, in the given order."""
        weights = weights or {}
        available = available or {}
        return [self.replica_state(n, weight=weights.get(n, 1.0), available=available.get(n, True)) for n in backends]

    def pool_capacity(self, backends: Iterable[str]) -> int | None:
        """Sum of max_running over the pool's fresh reports (None if none is fresh): the
        admission limit when the route configures none."""
        reports = [self.last_report(n) for n in backends]
        known = [r.max_running for r in reports if r is not None]
        return sum(known) if known else None

    # -- scraping ------------------------------------------------------------------------

    def start_scraping(self, backend: str, metrics_url: str, *, interval_s: float = SCRAPE_INTERVAL_S, labels: Mapping[str, str] | None = None) -> None:
        """Scrape `metrics_url` every `interval_s` in a background task (until `aclose`)."""
        if backend in self._tasks:
            raise ValueError(f"backend {backend!r} is already scraped")
        if self._client is None:
            # Short timeouts: a scrape slower than the interval is as good as missing.
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(interval_s * 2, connect=interval_s))
        self._tasks[backend] = asyncio.create_task(self._scrape_loop(backend, metrics_url, interval_s, labels), name=f"scrape:{backend}")

    def stop_scraping(self, backend: str) -> None:
        """Stop scraping a backend (a reload removed it)."""
        task = self._tasks.pop(backend, None)
        if task is not None:
            task.cancel()

    def scraped(self) -> set[str]:
        """The backends being scraped."""
        return set(self._tasks)

    async def scrape_once(self, backend: str, metrics_url: str, labels: Mapping[str, str] | None = None) -> LoadReport | None:
        """One scrape (errors are counted and logged, never raised: routing must go on)."""
        client = self._client or httpx.AsyncClient(timeout=2.0)
        try:
            resp = await client.get(metrics_url)
            resp.raise_for_status()
            return self.observe_metrics_text(backend, resp.text, labels)
        except (httpx.HTTPError, ValueError) as exc:
            self._get(backend).scrape_errors += 1
            log.debug("scrape of %s (%s) failed: %s", backend, metrics_url, exc)
            return None
        finally:
            if client is not self._client:
                await client.aclose()

    def scrape_errors(self, backend: str) -> int:
        return self._get(backend).scrape_errors

    async def _scrape_loop(self, backend: str, url: str, interval_s: float, labels: Mapping[str, str] | None) -> None:
        while True:
            started = time.monotonic()
            await self.scrape_once(backend, url, labels)
            # A fixed cadence, not a fixed pause: a slow scrape does not stretch the period.
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def aclose(self) -> None:
        """Stop every scrape task and close the HTTP client."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# ---------------------------------------------------------------------------
# /metrics parsing
# ---------------------------------------------------------------------------

# Gauges by the names turnout nodes and vLLM export (vLLM's v0 name for KV usage too).
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_FREE = "turnout:kv_free_blocks"
_BLOCK = "turnout:kv_block_size"
_MAX_RUNNING = "turnout:max_running"
_HEALTHY = "turnout:backend_healthy"
_CACHE_INFO = "vllm:cache_config_info"  # vLLM: labels block_size, num_gpu_blocks; value 1
_PREFIX_QUERIES = "vllm:prefix_cache_queries"
_PREFIX_HITS = "vllm:prefix_cache_hits"


def parse_load_metrics(
    text: str,
    labels: Mapping[str, str] | None = None,
    previous_prefix: tuple[float, float] | None = None,
    *,
    default_max_running: int = 256,
) -> tuple[LoadReport | None, tuple[float, float] | None]:
    """A LoadReport from Prometheus text with vLLM / turnout names, and the cumulative
    (prefix queries, prefix hits) for the next call's hit-rate delta.

    Samples are filtered by `labels` (e.g. {"backend": "gpu0"} on a node with several
    backends) and summed across what remains (one engine per server is the common case);
    KV usage takes the maximum (the fullest engine decides what fits). Returns (None, ...)
    when none of the load gauges is present.
    """
    values: dict[str, list[float]] = {}
    cache_info: dict[str, str] | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if labels and any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            name = sample.name
            if name.endswith("_total"):  # counters: the parser strips _total from the family only
                name = name[: -len("_total")]
            if name == _CACHE_INFO:
                cache_info = dict(sample.labels)
                continue
            values.setdefault(name, []).append(sample.value)

    def total(name: str) -> float | None:
        return sum(values[name]) if name in values else None

    usage_name = next((n for n in _KV_USAGE if n in values), None)
    running = total(_RUNNING)
    if usage_name is None and running is None:
        return None, previous_prefix
    usage = max(values[usage_name]) if usage_name else 0.0
    # vLLM reports usage in 0..1 despite the "_perc" name; guard against a 0..100 exporter.
    if usage > 1.0:
        usage /= 100.0
    report = LoadReport(
        kv_usage=usage,
        running=int(running or 0),
        waiting=int(total(_WAITING) or 0),
        max_running=default_max_running,
        timestamp=time.time(),
    )
    if _FREE in values and _BLOCK in values:
        report.kv_free_blocks = int(sum(values[_FREE]))
        report.block_size = int(max(values[_BLOCK]))
    elif cache_info is not None and usage_name is not None:
        # vLLM: derive free blocks from its configured pool size and the usage fraction.
        try:
            num_blocks = int(float(cache_info.get("num_gpu_blocks") or 0))
            block_size = int(float(cache_info.get("block_size") or 0))
        except ValueError:
            num_blocks = block_size = 0
        if num_blocks > 0 and block_size > 0:
            report.kv_free_blocks = int(num_blocks * (1.0 - usage))
            report.block_size = block_size
    if _MAX_RUNNING in values:
        report.max_running = max(1, int(sum(values[_MAX_RUNNING])))
    if _HEALTHY in values:
        report.healthy = min(values[_HEALTHY]) >= 1.0
    counters: tuple[float, float] | None = previous_prefix
    queries, hits = total(_PREFIX_QUERIES), total(_PREFIX_HITS)
    if queries is not None and hits is not None:
        counters = (queries, hits)
        if previous_prefix is not None and queries > previous_prefix[0]:
            report.prefix_cache_hit_rate = (hits - previous_prefix[1]) / (queries - previous_prefix[0])
        elif queries > 0:
            report.prefix_cache_hit_rate = hits / queries
    return report, counters
