"""The LoadTracker: ORCA headers, /metrics scraping (a real HTTP server on loopback serving
a vLLM-shaped /metrics), staleness, and reservations bridging the gaps between reports."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator

import pytest

from backends.protocol import LoadReport
from gateway.load_tracker import LoadTracker, parse_load_metrics


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",num_gpu_blocks="20000"} 1.0
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1000.0
# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 400.0
"""

TURNOUT_METRICS = """\
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{backend="gpu0",model_name="smollm2"} 0.5
vllm:kv_cache_usage_perc{backend="cpu",model_name="other"} 0.9
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{backend="gpu0",model_name="smollm2"} 4.0
vllm:num_requests_running{backend="cpu",model_name="other"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{backend="gpu0",model_name="smollm2"} 2.0
vllm:num_requests_waiting{backend="cpu",model_name="other"} 0.0
# TYPE turnout:kv_free_blocks gauge
turnout:kv_free_blocks{backend="gpu0",model_name="smollm2"} 128.0
turnout:kv_free_blocks{backend="cpu",model_name="other"} 0.0
# TYPE turnout:kv_block_size gauge
turnout:kv_block_size{backend="gpu0",model_name="smollm2"} 16.0
turnout:kv_block_size{backend="cpu",model_name="other"} 0.0
# TYPE turnout:max_running gauge
turnout:max_running{backend="gpu0",model_name="smollm2"} 8.0
turnout:max_running{backend="cpu",model_name="other"} 1.0
# TYPE turnout:backend_healthy gauge
turnout:backend_healthy{backend="gpu0",model_name="smollm2"} 1.0
turnout:backend_healthy{backend="cpu",model_name="other"} 0.0
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    body = VLLM_METRICS
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits += 1
        if self.path != "/metrics":
            self.send_response(404)
            self.end_headers()
            return
        data = type(self).body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"hits": 0, "body": VLLM_METRICS})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_header_round_trip_and_malformed_headers_are_ignored() -> None:
    clock = Clock()
    t = LoadTracker(clock=clock)
    sent = LoadReport(kv_usage=0.5, kv_free_blocks=100, block_size=16, running=3, waiting=1, max_running=8)
    got = t.observe_header("a", sent.to_header())
    assert got is not None and (got.kv_free_blocks, got.running, got.waiting, got.max_running) == (100, 3, 1, 8)
    assert t.observe_header("a", "TEXT named_metrics.kv_free_blocks=lots") is None
    assert t.observe_header("a", None) is None
    est = t.estimate("a")
    assert est is not None and est.kv_free_blocks == 100  # the bad header changed nothing


def test_reports_age_out() -> None:
    clock = Clock()
    t = LoadTracker(clock=clock, stale_after_s=5.0)
    t.observe("a", LoadReport(kv_usage=0.1, kv_free_blocks=90, block_size=16))
    clock.t += 4.9
    assert t.replica_state("a").load is not None
    clock.t += 0.2
    state = t.replica_state("a")
    assert state.load is None  # unknown: strategies fall back to in-flight counts
    assert t.pool_capacity(["a"]) is None


def test_reservations_bridge_the_gap_between_reports() -> None:
    clock = Clock()
    t = LoadTracker(clock=clock)
    t.observe("a", LoadReport(kv_usage=0.5, kv_free_blocks=100, block_size=16, running=2, waiting=0, max_running=3))
    before = t.reserve("a", prompt_tokens=320, max_tokens=160)  # 20 prompt blocks, 30 in all
    est = t.estimate("a")
    assert est is not None
    assert est.kv_free_blocks == 70 and est.running == 3 and est.waiting == 0
    assert est.kv_usage == pytest.approx(1 - 70 / 200)  # capacity 200 from usage 0.5, free 100
    second = t.reserve("a", prompt_tokens=16, max_tokens=0)
    est = t.estimate("a")
    assert est is not None and est.kv_free_blocks == 69 and (est.running, est.waiting) == (3, 1)
    assert t.in_flight("a") == 2
    t.release(second)  # sent after the report and done: its claim simply ends
    assert t.estimate("a").kv_free_blocks == 70  # type: ignore[union-attr]
    clock.t += 0.5
    t.observe("a", LoadReport(kv_usage=0.6, kv_free_blocks=80, block_size=16, running=3, max_running=3))
    assert t.estimate("a").kv_free_blocks == 80  # type: ignore[union-attr]  # the report counts `before`
    t.release(before)  # finished after the report that counted it: its prompt blocks come back
    est = t.estimate("a")
    assert est is not None and est.kv_free_blocks == 100 and est.running == 2
    t.release(before)  # idempotent
    assert t.in_flight("a") == 0


def test_parse_turnout_metrics_filters_by_backend_label() -> None:
    report, _ = parse_load_metrics(TURNOUT_METRICS, {"backend": "gpu0"})
    assert report is not None
    assert (report.kv_usage, report.kv_free_blocks, report.block_size) == (0.5, 128, 16)
    assert (report.running, report.waiting, report.max_running, report.healthy) == (4, 2, 8, True)
    cpu, _ = parse_load_metrics(TURNOUT_METRICS, {"backend": "cpu"})
    assert cpu is not None and cpu.healthy is False and cpu.block_size == 0
    assert parse_load_metrics("# nothing here\nsome_other_metric 1\n")[0] is None


async def test_scrape_a_vllm_server_over_loopback(metrics_server: tuple[str, type[_Handler]]) -> None:
    url, handler = metrics_server
    clock = Clock()
    t = LoadTracker(clock=clock, default_max_running=256)
    report = await t.scrape_once("vllm", url + "/metrics")
    assert report is not None
    assert (report.running, report.waiting, report.kv_usage) == (12, 3, 0.25)
    # Free blocks from vLLM's cache_config_info (20000 blocks) and the usage fraction.
    assert (report.kv_free_blocks, report.block_size, report.max_running) == (15000, 16, 256)
    assert report.prefix_cache_hit_rate == pytest.approx(0.4)
    # Next scrape: the hit rate is over the interval, from the counters' deltas.
    handler.body = VLLM_METRICS.replace("} 1000.0", "} 1100.0").replace("} 400.0", "} 490.0")
    report = await t.scrape_once("vllm", url + "/metrics")
    assert report is not None and report.prefix_cache_hit_rate == pytest.approx(0.9)
    # A failing scrape is counted, never raised.
    assert await t.scrape_once("vllm", url + "/nope") is None
    assert t.scrape_errors("vllm") == 1


async def test_background_scraping_keeps_the_report_fresh(metrics_server: tuple[str, type[_Handler]]) -> None:
    url, handler = metrics_server
    t = LoadTracker()
    t.start_scraping("vllm", url + "/metrics", interval_s=0.05)
    try:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if handler.hits >= 3:
                break
        assert handler.hits >= 3
        state = t.replica_state("vllm")
        assert state.load is not None and state.load.running == 12
        with pytest.raises(ValueError, match="already scraped"):
            t.start_scraping("vllm", url + "/metrics")
    finally:
        await t.aclose()
    hits = handler.hits
    await asyncio.sleep(0.15)
    assert handler.hits == hits  # the task stopped
