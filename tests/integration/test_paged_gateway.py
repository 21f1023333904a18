"""The paged engine behind the gateway: one config, a llama.cpp and a paged backend both
serving SmolLM2 through the same /v1 URL; the paged node's load and metrics; cancellation
frees KV blocks."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.protocol import LoadReport
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def both(model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [
            {"name": "cpu-llama", "kind": "llamacpp", "model": str(model_path), "served_name": "smollm2-135m",
             "options": {"n_ctx": 1024}},
            {"name": "paged", "kind": "paged", "model": str(model_path), "served_name": "smollm2-135m-paged",
             "options": {"num_blocks": 96, "max_model_len": 1024, "max_num_seqs": 8, "num_threads": 1}},
        ],
    }  # fmt: skip
    server = start_server(config, tmp_path_factory.mktemp("paged"), ready_timeout_s=120)
    yield server
    server.stop()


def metrics(server: Server) -> dict[tuple[str, str], float]:
    """(sample name, backend label) -> value."""
    text = httpx.get(server.url + "/metrics").text
    return {
        (s.name, s.labels.get("backend", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_both_backends_answer_through_one_url(both: Server) -> None:
    client = openai.OpenAI(base_url=both.base_url, api_key="unused", max_retries=0, timeout=120)
    assert sorted(m.id for m in client.models.list().data) == ["smollm2-135m", "smollm2-135m-paged"]
    for model in ("smollm2-135m", "smollm2-135m-paged"):
        r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 8
        stream = client.chat.completions.create(
            model=model, messages=HELLO, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content  # greedy: stream and non-stream agree
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_paged_node_reports_kv_load_and_vllm_metrics(both: Server) -> None:
    r = httpx.post(both.base_url + "/completions", json={"model": "smollm2-135m-paged", "prompt": "Hello", "max_tokens": 2}, timeout=60)
    report = LoadReport.from_header(r.headers["endpoint-load-metrics"])
    assert report.block_size == 16 and report.max_running == 8 and report.healthy
    assert 0 < report.kv_free_blocks <= 96
    m = metrics(both)
    assert m[("vllm:kv_cache_usage_perc", "paged")] >= 0.0
    assert m[("vllm:prompt_tokens_total", "paged")] > 0
    assert m[("vllm:generation_tokens_total", "paged")] >= 2
    assert ("vllm:prompt_tokens_total", "cpu-llama") not in m  # llama.cpp keeps no such counter


def test_prefix_cache_hits_for_a_shared_prefix(both: Server) -> None:
    system = "You are a meticulous assistant who answers in exactly one short sentence. " * 4
    before = metrics(both)[("vllm:prefix_cache_hits_total", "paged")]
    for question in ("What is 2+2?", "What is the capital of Italy?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        httpx.post(both.base_url + "/chat/completions", json={"model": "smollm2-135m-paged", "messages": messages, "max_tokens": 2}, timeout=60)
    assert metrics(both)[("vllm:prefix_cache_hits_total", "paged")] - before >= 16  # at least a block reused


def test_disconnect_mid_stream_frees_kv_blocks(both: Server) -> None:
    body = {"model": "smollm2-135m-paged", "messages": HELLO, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", both.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        busy = metrics(both)
        assert busy[("vllm:num_requests_running", "paged")] == 1
        assert busy[("turnout:kv_free_blocks", "paged")] < 96
    deadline = time.monotonic() + 10  # 900 tokens would take minutes on this CPU
    while time.monotonic() < deadline:
        m = metrics(both)
        if m[("vllm:num_requests_running", "paged")] == 0 and m[("turnout:kv_free_blocks", "paged")] == 96:
            return
        time.sleep(0.05)
    raise AssertionError(f"blocks not freed after the client left: {m}")
