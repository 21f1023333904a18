"""The gap a client sees where a stream resumes (gateway/resume.py): a program, not a test.

Two `turnout serve` nodes on loopback serve SmolLM2 on the paged engine; a gateway routes
one model over both with `resume: true`. Each trial streams a greedy chat through the
gateway, SIGKILLs the node it streams from after `--kill-after` content chunks, and
measures, from the client's side:

- the gap at the resume point: from the last chunk the failed node sent to the first chunk
  of the continuation;
- the same stream's inter-chunk gap before the kill (median): the peer, what a chunk
  normally takes;
- a fresh request's time to first token for the same prompt and the same text so far, sent
  straight to the killed node once it is started again (on its port, cold, after one short
  warm-up request): the continuation's own work, without the failure's detection and the
  gateway's take-over. The second peer.

The gateway waits for the restarted node to be scraped healthy before the next trial.

    .venv/bin/python -m gateway.bench.resume --trials 5
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.bench.harness import Server, start_server
from gateway.bench.machine import cpu_name

MODEL, NODE_MODEL = "smol", "smollm2-paged"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and his cat."}]


def node_config(model: str, threads: int) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1"},
        "backends": [
            {"name": "paged", "kind": "paged", "model": model, "served_name": NODE_MODEL, "preload": True,
             "options": {"num_blocks": 256, "max_model_len": 1024, "max_num_seqs": 4, "num_threads": threads}},
        ],
    }  # fmt: skip


def gateway_config(nodes: list[Server]) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1"},
        "backends": [{"name": f"node-{i}", "kind": "remote", "model": NODE_MODEL, "url": n.base_url} for i, n in enumerate(nodes)],
        "routes": [{"model": MODEL, "backends": [f"node-{i}" for i in range(len(nodes))], "strategy": "round_robin", "resume": True,
                    "timeouts": {"first_token_s": 60, "total_s": 300}}],
    }  # fmt: skip


def running(node: Server) -> float:
    for line in httpx.get(node.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.split()[-1])
    return 0.0


def healthy_in_gateway(gateway: Server, backend: str) -> bool:
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    return any(line.startswith("turnout:backend_healthy") and f'backend="{backend}"' in line and line.endswith(" 1.0") for line in text.splitlines())


def trial(gateway: Server, nodes: list[Server], kill_after: int, max_tokens: int) -> dict[str, Any]:
    """One stream with a kill: its chunk arrival times and which node died."""
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    times: list[float] = []
    texts: list[str] = []
    killed: int | None = None
    kill_at = 0
    with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            content = event["choices"][0]["delta"].get("content") if event.get("choices") else None
            if not content:
                continue
            times.append(time.perf_counter())
            texts.append(content)
            if killed is None and len(times) == kill_after:
                killed = next(i for i, node in enumerate(nodes) if running(node) > 0)
                nodes[killed].process.send_signal(signal.SIGKILL)
                kill_at = len(times)
    assert killed is not None, "the stream ended before the kill"
    before = [b - a for a, b in zip(times[: kill_at - 1], times[1:kill_at])]
    return {"killed": killed, "times": times, "kill_at": kill_at, "itl_ms": statistics.median(before) * 1e3, "text": "".join(texts[:kill_at])}


def resume_gap_ms(record: dict[str, Any]) -> float:
    """From the last chunk of the failed node to the first chunk after it. The failed node
    may have sent a chunk or two between the kill and its death: the gap is the largest
    after the kill."""
    times, at = record["times"], record["kill_at"]
    return max(b - a for a, b in zip(times[at - 1 :], times[at:])) * 1e3


def fresh_ttft_ms(node: Server, text: str) -> float:
    """A continuation of `text` sent straight to a node: its time to the first content."""
    body = {"model": NODE_MODEL, "messages": [*PROMPT, {"role": "assistant", "content": text}], "continue_final_message": True,
            "add_generation_prompt": False, "max_tokens": 4, "temperature": 0, "stream": True}  # fmt: skip
    start = time.perf_counter()
    with httpx.stream("POST", node.base_url + "/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    return (time.perf_counter() - start) * 1e3
    raise RuntimeError("no content")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.resume")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kill-after", type=int, default=24, help="content chunks read before the kill")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="each node's engine threads")
    parser.add_argument("--model", default=None, help="GGUF path (default: the pulled smollm2-135m)")
    args = parser.parse_args(argv)
    from backends.models import pull

    model = args.model or str(pull("smollm2-135m"))
    tmp = Path(tempfile.mkdtemp(prefix="turnout-resume-"))
    nodes = [start_server(node_config(model, args.threads), tmp, ready_timeout_s=180) for _ in range(2)]
    gateway = start_server(gateway_config(nodes), tmp)
    rows = []
    try:
        for _ in range(args.trials):
            record = trial(gateway, nodes, args.kill_after, args.max_tokens)
            dead = nodes[record["killed"]]
            restarted = nodes[record["killed"]] = start_server(node_config(model, args.threads), tmp, port=dead.port, ready_timeout_s=180)
            httpx.post(restarted.base_url + "/completions", json={"model": NODE_MODEL, "prompt": "warm up", "max_tokens": 2}, timeout=120)
            rows.append({"itl_ms": record["itl_ms"], "gap_ms": resume_gap_ms(record), "fresh_ttft_ms": fresh_ttft_ms(restarted, record["text"])})
            deadline = time.monotonic() + 60
            while not healthy_in_gateway(gateway, f"node-{record['killed']}") and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # past the circuit's view of the failure
    finally:
        for server in (gateway, *nodes):
            server.stop()
    print(f"machine: {cpu_name()}, {platform.machine()}, Python {platform.python_version()}; SmolLM2-135M paged (CPU, {args.threads} thread(s)/node)")
    print(f"{'trial':>5} {'ITL p50 ms':>10} {'resume gap ms':>13} {'added ms':>9} {'fresh TTFT ms':>13}")
    for i, row in enumerate(rows):
        print(f"{i:>5} {row['itl_ms']:>10.1f} {row['gap_ms']:>13.1f} {row['gap_ms'] - row['itl_ms']:>9.1f} {row['fresh_ttft_ms']:>13.1f}")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"{'median':>5} {med['itl_ms']:>10.1f} {med['gap_ms']:>13.1f} {med['gap_ms'] - med['itl_ms']:>9.1f} {med['fresh_ttft_ms']:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
