"""Benchmark (a program, not a test): routing strategies on three live paged-engine nodes.

Three `turnout serve` processes on loopback, each with one `paged` backend serving SmolLM2
with a small KV pool, behind one `turnout serve` gateway whose route reaches them as
`remote` backends (the gateway scrapes their /metrics every 500 ms and reads the
endpoint-load-metrics header on every response). For each strategy, the nodes and the
gateway are started afresh (every strategy starts with cold prefix caches and an empty
router), a short untimed warm-up goes to each node directly, and then the same multi-turn
workload runs through the gateway:

- `--conversations` chats of `--turns` turns each; chat i opens with system prompt
  i mod `--system-prompts` (long, shared), every user turn is a long message of its own,
  and each turn carries the whole history (the previous answers included);
- `--clients` requests in flight at most; greedy, `ignore_eos`, `--max-tokens` per answer.

Measured per strategy: the nodes' prefix-cache hit rate (sum over the nodes of the
vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total deltas, in prompt tokens),
time to first token at the client (first SSE chunk with text) p50 / p99, the workload's
wall time and how many requests each node got.

    .venv/bin/python -m gateway.bench.routing_live [--json docs/figures/routing_live.json]

A variant with other weights runs beside the defaults as LABEL=STRATEGY, its parameters
under LABEL: `--strategies round_robin,cache_aware,ca_p3=cache_aware --strategy-params
'{"ca_p3": {"prefix_weight": 3}}'`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.bench.harness import Server, start_server
from gateway.bench.machine import cpu_name

STRATEGIES = ("round_robin", "least_load", "prefix_affinity", "cache_aware")
SERVED = "smol"  # the nodes' model id
ALIAS = "chat"  # the gateway's route
WORDS = (
    "river mountain engine ledger harbour signal copper lantern orchard valley budget invoice "
    "meadow turbine archive compass glacier quarry tariff beacon canyon furnace harvest island "
    "journal kettle lagoon marble nectar orbit pillar quartz ribbon saddle timber umbrella "
    "velvet walnut yonder zephyr anchor bishop cobalt dagger ember falcon garnet hollow ivory "
    "jasmine kernel lumber mosaic nickel oyster pepper quiver rhubarb silver thistle"
).split()


# -- the workload ---------------------------------------------------------------------------------


def prose(rng: random.Random, words: int) -> str:
    """Deterministic filler text (~1.3 SmolLM2 tokens per word)."""
    out = []
    for i in range(words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i % 12 == 0 else w)
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out) + "."


@dataclass
class Workload:
    """Every conversation's system prompt and user turns (the answers come from the nodes)."""

    systems: list[str]
    conversations: list[tuple[int, list[str]]]  # (system prompt index, user messages)

    @classmethod
    def build(cls, conversations: int, turns: int, system_prompts: int, system_words: int, user_words: int, seed: int) -> Workload:
        rng = random.Random(seed)
        systems = [f"You are assistant #{k}. Follow these house rules. " + prose(rng, system_words) for k in range(system_prompts)]
        convs = [(i % system_prompts, [f"Question {i}.{t}: " + prose(rng, user_words) for t in range(turns)]) for i in range(conversations)]
        return cls(systems, convs)


@dataclass
class Sample:
    conversation: int
    turn: int
    ttft_s: float
    e2e_s: float
    status: int


async def one_turn(client: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int) -> tuple[int, float, float, str]:
    """Stream one chat turn; (status, TTFT, end-to-end seconds, answer text)."""
    body = {"model": ALIAS, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, float("nan"), time.perf_counter() - started, ""
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    return 200, (first or end) - started, end - started, "".join(text)


async def run_workload(base_url: str, work: Workload, clients: int, max_tokens: int) -> tuple[list[Sample], float]:
    """All conversations at once, each turn after the previous answer, `clients` in flight."""
    gate = asyncio.Semaphore(clients)
    samples: list[Sample] = []

    async def conversation(client: httpx.AsyncClient, i: int) -> None:
        system, turns = work.conversations[i]
        messages = [{"role": "system", "content": work.systems[system]}]
        for t, user in enumerate(turns):
            messages.append({"role": "user", "content": user})
            async with gate:
                status, ttft, e2e, answer = await one_turn(client, messages, max_tokens)
            samples.append(Sample(i, t, ttft, e2e, status))
            messages.append({"role": "assistant", "content": answer})

    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(conversation(client, i) for i in range(len(work.conversations))))
        return samples, time.perf_counter() - started


# -- the servers ----------------------------------------------------------------------------------


def node_config(model: Path, args: argparse.Namespace) -> dict:
    options = {"num_blocks": args.num_blocks, "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
               "num_threads": args.threads}  # fmt: skip
    return {
        "server": {"host": "127.0.0.1", "watch_config": False, "access_log": False},
        "backends": [{"name": "paged", "kind": "paged", "model": str(model), "served_name": SERVED, "options": options}],
    }


def gateway_config(nodes: list[Server], strategy: str, params: dict) -> dict:
    names = [f"node{i}" for i in range(len(nodes))]
    return {
        "server": {"host": "127.0.0.1", "watch_config": False, "access_log": False},
        "backends": [{"name": n, "kind": "remote", "model": SERVED, "url": s.base_url} for n, s in zip(names, nodes)],
        "routes": [{"model": ALIAS, "backends": names, "strategy": strategy, "strategy_params": params,
                    "prefix_hashing": {"block_size": 16, "max_blocks": 64}}],
    }  # fmt: skip


def node_counters(node: Server) -> dict[str, float]:
    """The node's prefix-cache counters (summed over its backends) and request count."""
    out = {"hits": 0.0, "queries": 0.0, "requests": 0.0}
    text = httpx.get(node.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:prefix_cache_hits_total":
                out["hits"] += s.value
            elif s.name == "vllm:prefix_cache_queries_total":
                out["queries"] += s.value
            elif s.name == "turnout_requests_total" and s.labels.get("status") == "200":
                out["requests"] += s.value
    return out


def warm_up(node: Server) -> None:
    """One short request: first-call costs (allocator, kernels) stay out of the figures. Its
    prompt shares nothing with the workload."""
    body = {"model": SERVED, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0}
    httpx.post(node.base_url + "/chat/completions", json=body, timeout=120).raise_for_status()


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Result:
    strategy: str
    hit_rate: float
    hit_tokens: float
    query_tokens: float
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    wall_s: float
    requests: int
    errors: int
    per_node_requests: list[int] = field(default_factory=list)
    per_node_hit_rate: list[float] = field(default_factory=list)


def run_strategy(strategy: str, params: dict, model: Path, work: Workload, args: argparse.Namespace, tmp: Path) -> Result:
    """Fresh nodes and gateway, warm-up, the workload, the figures; everything stopped after."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{strategy}-", dir=tmp))
    nodes: list[Server] = []
    gateway: Server | None = None
    try:
        with ThreadPoolExecutor(3) as pool:  # load the three models side by side
            futures = [pool.submit(start_server, node_config(model, args), run_dir, ready_timeout_s=180) for _ in range(3)]
            nodes = [f.result() for f in futures]
        for node in nodes:
            warm_up(node)
        gateway = start_server(gateway_config(nodes, strategy, params), run_dir)
        time.sleep(1.0)  # a couple of scrapes: the router starts with fresh load reports
        before = [node_counters(n) for n in nodes]
        samples, wall = asyncio.run(run_workload(gateway.base_url, work, args.clients, args.max_tokens))
        after = [node_counters(n) for n in nodes]
    finally:
        for server in [gateway, *nodes]:
            if server is not None:
                server.stop()
    hits = [a["hits"] - b["hits"] for a, b in zip(after, before)]
    queries = [a["queries"] - b["queries"] for a, b in zip(after, before)]
    ok = [s for s in samples if s.status == 200]
    ttfts = [s.ttft_s for s in ok]
    return Result(
        strategy=strategy,
        hit_rate=sum(hits) / sum(queries) if sum(queries) else 0.0,
        hit_tokens=sum(hits),
        query_tokens=sum(queries),
        ttft_p50_s=percentile(ttfts, 0.50),
        ttft_p99_s=percentile(ttfts, 0.99),
        ttft_mean_s=statistics.fmean(ttfts) if ttfts else float("nan"),
        wall_s=wall,
        requests=len(samples),
        errors=len(samples) - len(ok),
        per_node_requests=[int(a["requests"] - b["requests"]) for a, b in zip(after, before)],
        per_node_hit_rate=[h / q if q else 0.0 for h, q in zip(hits, queries)],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated; LABEL=STRATEGY runs a variant")
    ap.add_argument("--strategy-params", default="{}", help='JSON by strategy or label: {"ca_tuned": {"prefix_weight": 3}}')
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-prompts", type=int, default=3)
    ap.add_argument("--system-words", type=int, default=110, help="~1.3 tokens per word")
    ap.add_argument("--user-words", type=int, default=75)
    ap.add_argument("--clients", type=int, default=4, help="requests in flight at most")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--num-blocks", type=int, default=128, help="each node's KV pool, in 16-token blocks")
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per node")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    from backends.models import pull

    model = pull("smollm2-135m")
    work = Workload.build(args.conversations, args.turns, args.system_prompts, args.system_words, args.user_words, args.seed)
    params = json.loads(args.strategy_params)
    meta = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_start": os.getloadavg(), "model": "smollm2-135m",
        "nodes": 3, "threads_per_node": args.threads, "num_blocks": args.num_blocks, "block_size": 16,
        "max_num_seqs": args.max_num_seqs, "conversations": args.conversations, "turns": args.turns,
        "system_prompts": args.system_prompts, "clients": args.clients, "max_tokens": args.max_tokens,
        "strategy_params": params, "argv": sys.argv[1:],
    }  # fmt: skip
    print(json.dumps(meta), flush=True)
    results: list[Result] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        for spec in args.strategies.split(","):
            label, _, strategy = spec.partition("=")  # "label=strategy": a variant with its own params
            r = run_strategy(strategy or label, params.get(label, {}), model, work, args, Path(tmp))
            r.strategy = label
            results.append(r)
            print(json.dumps(r.__dict__), flush=True)
    meta["loadavg_end"] = os.getloadavg()
    meta["total_s"] = round(time.perf_counter() - started, 1)

    base = next((r.hit_rate for r in results if r.strategy == "round_robin"), None)
    print(f"\n{'strategy':<18} {'hit rate':>8} {'x rr':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'wall':>7} {'errors':>6}  requests per node")
    for r in results:
        ratio = f"{r.hit_rate / base:.2f}" if base else "-"
        print(f"{r.strategy:<18} {r.hit_rate:>8.1%} {ratio:>6} {r.ttft_p50_s * 1000:>7.0f}ms {r.ttft_p99_s * 1000:>7.0f}ms"
              f" {r.wall_s:>6.1f}s {r.errors:>6}  {r.per_node_requests}")  # fmt: skip
    print(f"\ntotal {meta['total_s']} s; load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": [r.__dict__ for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
