"""Stream resume on a real pair of nodes: two `turnout serve` nodes, each serving SmolLM2 on
the paged engine, behind a gateway whose route has `resume: true`. A node killed mid-stream
(SIGKILL, its engine worker with it) leaves the client one uninterrupted stream whose text
equals an uninterrupted run's, at temperature 0, and whose usage counts each token once."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

MODEL = "smol"
NODE_MODEL = "smollm2-paged"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and his cat."}]
MAX_TOKENS = 96
KILL_AFTER = 12  # content chunks the client reads before the node it streams from is killed


def node_config(model_path: Path) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1"},
        "backends": [
            {"name": "paged", "kind": "paged", "model": str(model_path), "served_name": NODE_MODEL, "preload": True,
             "options": {"num_blocks": 128, "max_model_len": 1024, "max_num_seqs": 4, "num_threads": 1}},
        ],
    }  # fmt: skip


@pytest.fixture()
def cluster(model_path: Path, tmp_path: Path) -> Iterator[tuple[list[Server], Server]]:
    """Two nodes and a gateway routing MODEL over both, with resume on."""
    nodes = [start_server(node_config(model_path), tmp_path, ready_timeout_s=120) for _ in range(2)]
    timeouts = {"first_token_s": 60, "total_s": 120}
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [
            {"name": f"node-{i}", "kind": "remote", "model": NODE_MODEL, "url": node.base_url, "metrics_url": "none"}
            for i, node in enumerate(nodes)
        ],
        "routes": [{"model": MODEL, "backends": ["node-0", "node-1"], "strategy": "round_robin", "resume": True, "timeouts": timeouts}],
    }
    gateway = start_server(config, tmp_path)
    yield nodes, gateway
    for server in (gateway, *nodes):
        server.stop()


def running(node: Server) -> float:
    """The node's running requests (its vLLM-named gauge)."""
    for line in httpx.get(node.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.split()[-1])
    return 0.0


def stream(gateway: Server, on_chunk: Any = None) -> list[dict[str, Any]]:
    """One greedy streamed chat through the gateway; every event's JSON."""
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 7, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line.removeprefix("data: ")))
            if on_chunk is not None:
                on_chunk(events)
    return events


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def test_a_node_killed_mid_stream_is_resumed_on_the_other_token_for_token(cluster: tuple[list[Server], Server]) -> None:
    nodes, gateway = cluster
    reference = stream(gateway)
    assert "error" not in reference[-1] and len(text_of(reference)) > 100

    killed: list[Server] = []

    def kill_when_under_way(events: list[dict[str, Any]]) -> None:
        content = [e for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]
        if killed or len(content) < KILL_AFTER:
            return
        serving = [node for node in nodes if running(node) > 0]
        assert len(serving) == 1, "one node serves the stream"
        serving[0].process.send_signal(signal.SIGKILL)
        killed.append(serving[0])

    started = time.monotonic()
    resumed = stream(gateway, kill_when_under_way)
    assert killed and killed[0].process.wait(timeout=10) == -signal.SIGKILL
    assert "error" not in resumed[-1], resumed[-1]
    assert text_of(resumed) == text_of(reference), "the resumed text equals the uninterrupted run's"
    assert {e["id"] for e in resumed} == {resumed[0]["id"]}, "one stream id"
    finishes = [e["choices"][0]["finish_reason"] for e in resumed if e.get("choices") and e["choices"][0]["finish_reason"]]
    assert finishes == [reference[-2]["choices"][0]["finish_reason"]]
    roles = [e["choices"][0]["delta"].get("role") for e in resumed if e.get("choices")]
    assert roles.count("assistant") == 1
    assert resumed[-1]["usage"] == reference[-1]["usage"], "usage counts each token once"
    assert time.monotonic() - started < 120
    # The gateway counts it against the node that failed.
    left = f"node-{nodes.index(killed[0])}"
    metrics = httpx.get(gateway.url + "/metrics", timeout=5).text
    assert f'turnout_stream_resumes_total{{backend="{left}",model="{MODEL}"}} 1.0' in metrics, metrics
