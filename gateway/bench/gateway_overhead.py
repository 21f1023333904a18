"""Benchmark (a program, not a test): what the gateway adds over its upstream, against
LiteLLM proxy, measured in one run on one machine.

The same load (`turnout bench serve`, aiohttp client, closed loop) against
  (a) upstream  the fake OpenAI upstream directly (gateway/bench/fake_upstream.py, tokens at once);
  (b) turnout   `turnout serve`, one worker: API key auth (Redis key store), Redis rate limits
                (key and tenant, RPM and TPM, a real redis-server on loopback), a route with
                least_load routing, retries and admission control over a remote backend,
                Prometheus metrics, the JSON access log (to a file);
  (c) litellm   LiteLLM proxy (`litellm[proxy]`, one worker, a master key), same upstream.
For each, streamed and not: concurrency 1 (latency: added p50/p99 = target - upstream) and a
concurrency sweep (the highest requests/s whose e2e p99 stays under 100 ms).

    .venv/bin/python -m gateway.bench.gateway_overhead [--quick] [--only upstream,turnout]
        [--json out/overhead.json] [--plot out/overhead.png]

LiteLLM proxy lives in its own virtualenv (.bench-venv, git-ignored), created here when
missing (`pip install 'litellm[proxy]'`), so it never changes .venv's versions. Everything
listens on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.bench.harness import REPO, RedisServer, free_port
from gateway.bench.serve import BenchConfig, best_under, format_table, plot, run_bench
from gateway.keys import RedisKeyStore, new_key

BENCH_VENV = REPO / ".bench-venv"
MODEL = "fake"
P99_BUDGET_MS = 100.0
MASTER_KEY = "sk-bench-master-0123456789"
HUGE = 10**9  # limits that never deny: we time the decision, not 429s


# -- processes ---------------------------------------------------------------------------------


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not become ready in {timeout_s:g}s:\n{log.read_text()[-3000:]}")


@contextmanager
def _process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        args, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its own group: LiteLLM's uvicorn children too
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def ensure_litellm_venv() -> Path:
    """.bench-venv/bin/litellm, installing `litellm[proxy]` there first when missing."""
    exe = BENCH_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"creating {BENCH_VENV} with litellm[proxy] (once)...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def litellm_version() -> str:
    out = subprocess.run(
        [str(BENCH_VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip() or "?"


def turnout_config(upstream_url: str, redis_url: str, port: int) -> dict[str, Any]:
    """Every feature on: keys (Redis store), Redis limits, routing, admission, metrics, access log."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "access_log": True, "watch_config": True},
        "auth": {"store": "redis"},
        "redis": {"url": redis_url, "timeout_ms": 50, "fail_mode": "open", "prefix": "bench:"},
        "limits": {"key": {"rpm": HUGE, "tpm": HUGE}, "tenant": {"rpm": HUGE, "tpm": HUGE}},
        "backends": [{"name": "up", "kind": "remote", "model": MODEL, "url": upstream_url, "options": {"max_connections": 256}}],
        "routes": [
            {
                "model": MODEL,
                "backends": ["up"],
                "strategy": "least_load",
                "retries": {"max_retries": 1},
                "admission": {"limit": 512, "max_queue": 1024},
            }
        ],
    }


def litellm_config(upstream_url: str) -> dict[str, Any]:
    return {
        "model_list": [
            {"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_base": upstream_url, "api_key": "sk-fake"}}
        ],
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True, "set_verbose": False},
    }


# -- measuring ---------------------------------------------------------------------------------


async def measure(url: str, key: str | None, *, stream: bool, quick: bool, sweep: list[int]) -> dict[str, Any]:
    """Latency at c=1, then the concurrency sweep."""
    n1 = 300 if quick else 1500
    latency = await run_bench(
        BenchConfig(url=url, model=MODEL, api_key=key, stream=stream, concurrency=[1], requests=n1, duration_s=20,
                    warmup=50, max_tokens=16, progress=False)
    )  # fmt: skip
    levels = await run_bench(
        BenchConfig(url=url, model=MODEL, api_key=key, stream=stream, concurrency=sweep, requests=800 if quick else 3000,
                    duration_s=6 if quick else 12, warmup=20, max_tokens=16, progress=False, p99_budget_ms=P99_BUDGET_MS)
    )  # fmt: skip
    return {"c1": latency["levels"][0], "sweep": levels}


def added(target: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    t, b = target["c1"]["e2e_ms"], base["c1"]["e2e_ms"]
    return {"p50": round(t["p50"] - b["p50"], 3), "p99": round(t["p99"] - b["p99"], 3)}


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """The comparison as a markdown table."""
    rows = [
        "| target | mode | c=1 e2e p50 (ms) | c=1 e2e p99 (ms) | added p50 (ms) | added p99 (ms) | max req/s with p99 < 100 ms (at c) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in ("non-streamed", "streamed"):
        base = results.get("upstream", {}).get(mode)
        for name, per_mode in results.items():
            r = per_mode.get(mode)
            if r is None:
                continue
            e2e = r["c1"]["e2e_ms"]
            add = added(r, base) if base is not None and name != "upstream" else None
            best = best_under(r["sweep"]["levels"], P99_BUDGET_MS)
            best_text = f"{best['requests_per_s']:.0f} (c={best['value']:g})" if best else "none"
            rows.append(
                f"| {name} | {mode} | {e2e['p50']:.2f} | {e2e['p99']:.2f} | "
                f"{_num(add, 'p50')} | {_num(add, 'p99')} | {best_text} |"
            )
    return "\n".join(rows)


def _num(values: dict[str, float] | None, key: str) -> str:
    return "-" if values is None else f"{values[key]:.2f}"


# -- the run -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per level (a smoke run)")
    parser.add_argument("--only", default="upstream,turnout,litellm", help="comma-separated targets")
    parser.add_argument("--sweep", default="1,2,4,8,16,32,64", help="concurrency levels")
    parser.add_argument("--modes", default="non-streamed,streamed")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--plot", help="PNG of the non-streamed sweeps")
    parser.add_argument("--keep", action="store_true", help="leave the servers up until Enter (for profiling)")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.only.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sweep = [int(x) for x in args.sweep.split(",")]
    work = Path(tempfile.mkdtemp(prefix="turnout-overhead-"))
    py = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
    if "litellm" in targets:
        ensure_litellm_venv()

    redis = RedisServer(port=free_port(), log=work / "redis.log")
    redis.start()
    up_port, turnout_port, litellm_port = free_port(), free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    results: dict[str, dict[str, Any]] = {}
    try:
        with _process([py, "-m", "gateway.bench.fake_upstream", "--port", str(up_port), "--model", MODEL], work / "upstream.log") as up:
            _wait_ready(f"http://127.0.0.1:{up_port}/healthz", up, work / "upstream.log", 20)
            for target in targets:
                print(f"== {target}", file=sys.stderr)
                with _target(target, py, work, upstream_url, redis.url, turnout_port, litellm_port) as (url, key):
                    if args.keep:
                        print(f"{target} at {url} key {key}; Enter to go on", file=sys.stderr)
                        input()
                    results[target] = {}
                    for mode in modes:
                        r = asyncio.run(measure(url, key, stream=mode == "streamed", quick=args.quick, sweep=sweep))
                        results[target][mode] = r
                        print(f"-- {target} {mode}\n{format_table({'levels': [r['c1']]})}\n{format_table(r['sweep'])}", file=sys.stderr)
    finally:
        redis.stop()

    load = os.getloadavg()
    header = (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"load average after the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    if "litellm" in targets:
        header += f"; litellm {litellm_version()}"
    print(header)
    print(summary_table(results))
    for mode in modes:
        if "turnout" in results and "litellm" in results:
            t = best_under(results["turnout"][mode]["sweep"]["levels"], P99_BUDGET_MS)
            lt = best_under(results["litellm"][mode]["sweep"]["levels"], P99_BUDGET_MS)
            if t and lt:
                print(f"{mode}: turnout / litellm sustained req/s = {t['requests_per_s'] / lt['requests_per_s']:.1f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": header, "results": results}, indent=1))
    if args.plot:
        plot({name: r[modes[0]]["sweep"] for name, r in results.items()}, Path(args.plot))
    return 0


@contextmanager
def _target(
    target: str, py: str, work: Path, upstream_url: str, redis_url: str, turnout_port: int, litellm_port: int
) -> Iterator[tuple[str, str | None]]:
    """Start one target; yield its base URL and API key."""
    if target == "upstream":
        yield upstream_url, None
        return
    if target == "turnout":
        secret, record = new_key("bench", tenant="bench")
        RedisKeyStore(redis_url, "bench:").add(record)
        config = work / "turnout.yaml"
        config.write_text(yaml.safe_dump(turnout_config(upstream_url, redis_url, turnout_port)))
        log = work / "turnout.log"
        with _process([py, "-m", "gateway.cli", "serve", "--config", str(config), "--log-level", "warning"], log) as p:
            _wait_ready(f"http://127.0.0.1:{turnout_port}/readyz", p, log, 60)
            yield f"http://127.0.0.1:{turnout_port}/v1", secret
        return
    if target == "litellm":
        exe = ensure_litellm_venv()
        config = work / "litellm.yaml"
        config.write_text(yaml.safe_dump(litellm_config(upstream_url)))
        log = work / "litellm.log"
        env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True"}
        cmd = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(litellm_port), "--num_workers", "1"]
        with _process(cmd, log, env) as p:
            _wait_ready(f"http://127.0.0.1:{litellm_port}/health/liveliness", p, log, 180)
            yield f"http://127.0.0.1:{litellm_port}/v1", MASTER_KEY
        return
    raise SystemExit(f"unknown target {target!r}")


if __name__ == "__main__":
    raise SystemExit(main())
