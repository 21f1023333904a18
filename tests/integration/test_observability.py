"""Traces, access logs and metrics: a traced request's span tree and its traceparent into a
remote node; JSON access lines; the metrics page with several workers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.keys import FileKeyStore, new_key
from policies.schema import Config
from tests.conftest import Server, llamacpp_config, start_server

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def traced_node(model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A llama.cpp node that traces too (spans printed to its log), so it shows the trace id
    it continued."""
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "node"}
    server = start_server(llamacpp_config(model_path, n_ctx=1024), tmp_path_factory.mktemp("tnode"), env=env)
    yield server
    server.stop()


def gateway_config(node: Server, keys: Path, *, log_prompts: bool = False) -> Config:
    return Config.model_validate(
        {
            "server": {"host": "127.0.0.1", "log_prompts": log_prompts, "watch_config": False},
            "auth": {"store": "file", "path": str(keys)},
            "limits": {"key": {"rpm": 1000}},
            "backends": [{"name": "node", "kind": "remote", "model": "smollm2-135m", "url": node.base_url}],
        }
    )


@pytest.fixture()
def key(tmp_path: Path) -> tuple[str, Path]:
    path = tmp_path / "keys.json"
    secret, record = new_key("observer", tenant="team-a")
    FileKeyStore(str(path)).add(record)
    return secret, path


async def call(app, secret: str, body: dict, headers: dict | None = None) -> httpx.Response:  # type: ignore[no-untyped-def]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
            return await client.post(
                "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}", **(headers or {})}
            )


BODY = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


@pytest.mark.parametrize("stream", [False, True])
async def test_span_tree_and_traceparent_into_the_node(traced_node: Server, key: tuple[str, Path], stream: bool) -> None:
    secret, keys = key
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(gateway_config(traced_node, keys), tracer_provider=provider)
    r = await call(app, secret, {**BODY, "stream": stream}, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200

    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["chat smollm2-135m"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID  # continues the client's trace
    assert root.attributes["gen_ai.request.model"] == "smollm2-135m"
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.usage.output_tokens"] > 0 and root.attributes["gen_ai.usage.input_tokens"] > 0
    children = {"turnout.auth", "turnout.rate_limit", "turnout.route", "turnout.backend node"}
    assert children <= set(spans)
    for name in children:
        assert spans[name].parent.span_id == root.context.span_id, name
    assert spans["turnout.route"].attributes["turnout.backend"] == "node"
    if stream:
        assert [e.name for e in spans["turnout.backend node"].events] == ["gen_ai.first_chunk"]
    # The node continued the same trace: its access log line carries the trace id. The node
    # writes that line after its last byte went out, so it may land a moment after our answer.
    trace_ids: set[str | None] = set()
    for _ in range(100):
        lines = [json.loads(line.split(": ", 1)[1]) for line in traced_node.log.read_text().splitlines() if "turnout.access" in line]
        trace_ids = {line["trace_id"] for line in lines}
        if TRACE_ID in trace_ids:
            break
        await asyncio.sleep(0.05)
    assert TRACE_ID in trace_ids


async def test_access_log_lines(traced_node: Server, key: tuple[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    secret, keys = key
    caplog.set_level(logging.INFO, logger="turnout.access")
    app = create_app(gateway_config(traced_node, keys))
    r = await call(app, secret, BODY, headers={"x-request-id": "req-observed-1"})
    assert r.status_code == 200
    line = json.loads(next(rec.getMessage() for rec in caplog.records if rec.name == "turnout.access"))
    assert line["request_id"] == "req-observed-1" and line["tenant"] == "team-a"
    assert line["key"] and secret not in json.dumps(line)  # the key's id, never its secret
    assert line["model"] == "smollm2-135m" and line["backend"] == "node" and line["status"] == 200
    assert line["completion_tokens"] == r.json()["usage"]["completion_tokens"] and line["e2e_ms"] > 0
    assert "prompt" not in line

    caplog.clear()
    app = create_app(gateway_config(traced_node, keys, log_prompts=True))
    await call(app, secret, BODY)
    line = json.loads(next(rec.getMessage() for rec in caplog.records if rec.name == "turnout.access"))
    assert "Say hi." in line["prompt"]


def test_metrics_count_requests_across_workers(traced_node: Server, tmp_path: Path) -> None:
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [{"name": "node", "kind": "remote", "model": "smollm2-135m", "url": traced_node.base_url}],
    }
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"])
    gateway = start_server(config, tmp_path, env=env, extra_args=["--workers", "2"])
    try:
        for _ in range(10):
            r = httpx.post(gateway.base_url + "/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1}, timeout=60)
            assert r.status_code == 200
        bad = httpx.post(gateway.base_url + "/completions", json={"model": "nope", "prompt": "Hi"}, timeout=60)
        assert bad.status_code == 404
        for _ in range(4):  # whichever worker answers the scrape, the totals are the same
            families = {f.name: f for f in text_string_to_metric_families(httpx.get(gateway.url + "/metrics").text)}
            requests = families["turnout_requests"].samples
            ok = sum(s.value for s in requests if s.name == "turnout_requests_total" and s.labels["status"] == "200")
            missing = sum(s.value for s in requests if s.name == "turnout_requests_total" and s.labels["status"] == "404")
            assert ok == 10 and missing == 1
            e2e = families["turnout_request_duration_seconds"].samples
            assert sum(s.value for s in e2e if s.name.endswith("_count")) == 11
    finally:
        gateway.stop()
