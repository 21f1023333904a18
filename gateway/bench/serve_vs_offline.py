"""Benchmark (a program, not a test): the paged engine served over HTTP against the same
engine offline, on one GPU, in one run.

For each shape: `gateway.bench.engine` offline (N requests at once, fixed prompt and output
lengths, random weights), then `turnout serve` with one `kind: paged` backend on the same
shape (its engine in a worker process of its own, `preload: true`) loaded by
`turnout bench serve` at concurrency N, streamed and not, with `ignore_eos` so that every
answer is exactly `--output-len` tokens. Prints output tok/s of each and the ratio.

`--workers 1,4` serves each shape once per count of HTTP processes (`turnout serve --workers
N`: N HTTP processes in front of one engine worker). The load comes from `--clients`
load-generator processes at once (concurrency split between them), so that the client's own
SSE parsing is not what is measured; their output tokens are summed over the longest one's
measured wall time.

Each load level is profiled from the engine's own counters on the gateway's /metrics, scraped
before the level starts and again `SETTLE_S` after it ends (the engine worker reports every
0.1 s while busy, 0.5 s idle, so the wait lets the last figures arrive): steps, mean step time,
decode tokens per step, and the engine thread's wall split into in-step (busy), delivering
outputs (the worker's encode and send), draining commands, idle and the rest (see
`level_profile`). The offline run's step figures are printed beside them.

`--repeats R` runs offline and served R times per shape, interleaved, and reports the medians
and the median of each repeat's served/offline ratio: on the lent machines one host-bound
offline figure moved by 2x between runs of one call (docs/benchmarks.md), more than the gap
being measured.

    python3 -m gateway.bench.serve_vs_offline --shapes smollm2-135m,llama3-8b --workers 1,4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
PY_SPY_S = 4  # seconds of stacks per level with --py-spy
SETTLE_S = 1.0  # after a level, before the last scrape: the worker's idle load reports come every 0.5 s

# Engine counters a level's profile is made of: short name -> metric family on /metrics.
PROFILE_COUNTERS = {
    "steps": "turnout:paged_steps",
    "step_s": "turnout:paged_step_seconds",
    "sync_wait_s": "turnout:paged_sync_wait_seconds",
    "decode_tokens": "turnout:paged_decode_tokens",
    "prefill_tokens": "turnout:paged_prefill_tokens",
    "graph_steps": "turnout:paged_graph_steps",
    "idle_s": "turnout:paged_idle_seconds",
    "deliver_s": "turnout:paged_deliver_seconds",
    "drain_s": "turnout:paged_drain_seconds",
    "loop_s": "turnout:paged_loop_seconds",
}


def offline(shape: str, args: argparse.Namespace, out: Path, count: int) -> dict[str, Any]:
    """The `gateway.bench.engine` result ("engine") of the best of `count` runs by output
    tok/s: the first process on a fresh machine pays for cold kernel caches
    (docs/benchmarks.md, "Paged engine on GPU")."""
    runs = [_offline_once(shape, args, out.with_suffix(f".{i}.json")) for i in range(count)]
    return max(runs, key=lambda r: float(r["output_tok_s"]))


def _offline_once(shape: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gateway.bench.engine", "--shape", shape, "--no-transformers", "--num-requests", str(args.concurrency),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--device", args.device, "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, timeout=900)
    return dict(json.loads(out.read_text())["engine"])


def offline_steps(engine: dict[str, Any]) -> dict[str, float]:
    """The offline run's step figures, to set beside a served level's: wall per step (its
    whole timed run over the steps that ran the model, prefill ones too: the served
    `step_ms` counts the same steps), mean decode-only step, mean decode batch."""
    steps = int(engine.get("steps", 0))
    return {
        "steps": float(steps),
        "decode_steps": float(engine.get("decode_steps", 0)),
        "wall_ms_per_step": float(engine["duration_s"]) * 1e3 / steps if steps else 0.0,
        "decode_step_ms": float(engine.get("decode_step_ms", {}).get("mean", 0.0)),
        "decode_batch_mean": float(engine.get("decode_batch_mean", 0.0)),
    }


def engine_counters(text: str) -> dict[str, float]:
    """PROFILE_COUNTERS' values on a /metrics page (Prometheus text), each summed over its
    labels (one paged backend per gateway here); 0 for those missing."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {family: short for short, family in PROFILE_COUNTERS.items()}
    wanted |= {family + "_total": short for family, short in list(wanted.items())}
    out = dict.fromkeys(PROFILE_COUNTERS, 0.0)
    # By sample name: the parser does not always group `name_total` samples under `name` (not
    # for names with a colon), and a counter's `_created` sample must not be summed.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            short = wanted.get(sample.name)
            if short is not None:
                out[short] += sample.value
    return out


def level_profile(before: str, after: str, wall_s: float) -> dict[str, float]:
    """Where a load level's engine time went, from two /metrics pages (before the level, and
    SETTLE_S after it ended) and `wall_s`: the time between the two scrapes less SETTLE_S.

    Per step: `step_ms` (time inside `LLMEngine.step()`; `sync_wait_ms_per_step` of it spent
    waiting for the device's tokens: near 0 when the host bounds the step), `deliver_ms_per_step` and
    `drain_ms_per_step` (the engine thread's), `other_ms_per_step` (the rest of its busy time:
    the loop's own bookkeeping, and the last collect of an async-scheduled run, which is no
    step), their sum `active_ms_per_step` (the thread's wall less its idle waits, per step: to
    set beside the offline run's wall per step), `decode_tokens_per_step` (mean decode batch).

    Fractions (`busy` in steps, `deliver`, `drain`, `idle`, `other`; they sum to 1) are of the
    engine thread's wall between the two reports the pages show (`engine_wall_s`, the delta of
    `turnout:paged_loop_seconds`: numerator and denominator from the same two instants), or of
    `wall_s` where that counter is missing. Each report may be up to 0.5 s old when scraped
    and the last one up to SETTLE_S after the level ended, so up to ~1.5 s of `idle_s` is the
    level's edges (the load generators starting, the settle wait); the per-step figures and
    the other fractions' ratios to each other are free of that."""
    a, b = engine_counters(before), engine_counters(after)
    d = {k: b[k] - a[k] for k in PROFILE_COUNTERS}
    steps = d["steps"]
    window = d["loop_s"] if d["loop_s"] > 0 else wall_s
    other_s = max(0.0, window - d["idle_s"] - d["step_s"] - d["deliver_s"] - d["drain_s"]) if window > 0 else 0.0

    def per_step_ms(seconds: float) -> float:
        return seconds * 1e3 / steps if steps else 0.0

    def share(seconds: float) -> float:
        return seconds / window if window > 0 else 0.0

    return {
        "wall_s": wall_s,
        "engine_wall_s": d["loop_s"],
        "idle_s": d["idle_s"],
        "steps": steps,
        "graph_steps": d["graph_steps"],
        "active_ms_per_step": per_step_ms(d["step_s"] + d["deliver_s"] + d["drain_s"] + other_s),
        "step_ms": per_step_ms(d["step_s"]),
        "sync_wait_ms_per_step": per_step_ms(d["sync_wait_s"]),
        "deliver_ms_per_step": per_step_ms(d["deliver_s"]),
        "drain_ms_per_step": per_step_ms(d["drain_s"]),
        "other_ms_per_step": per_step_ms(other_s),
        "decode_tokens_per_step": d["decode_tokens"] / steps if steps else 0.0,
        "prefill_tokens": d["prefill_tokens"],
        "busy": share(d["step_s"]),
        "deliver": share(d["deliver_s"]),
        "drain": share(d["drain_s"]),
        "idle": share(d["idle_s"]),
        "other": share(other_s),
    }


def profile_line(mode: str, p: dict[str, float], off: dict[str, float]) -> str:
    """One compact line of a level's profile, the offline run's step figures beside it:

      stream 2,310 steps: active 9.81 ms/step (offline 9.02 wall/step, 8.95 decode step) = step 8.90 + deliver 0.700
      + drain 0.050 + other 0.160; 221.6 decode tok/step (offline 252.1), 65,536 prefill tok; engine thread 24.1 s:
      busy 85% deliver 7% drain 0% idle 6% other 2%

    (one line, wrapped here)."""
    return (f"  {mode:6s} {p['steps']:,.0f} steps: active {p['active_ms_per_step']:.2f} ms/step (offline "
            f"{off['wall_ms_per_step']:.2f} wall/step, {off['decode_step_ms']:.2f} decode step) = step {p['step_ms']:.2f} (GPU wait {p.get('sync_wait_ms_per_step', 0.0):.2f}) "
            f"+ deliver {p['deliver_ms_per_step']:.3f} + drain {p['drain_ms_per_step']:.3f} + other {p['other_ms_per_step']:.3f}; "
            f"{p['decode_tokens_per_step']:.1f} decode tok/step (offline {off['decode_batch_mean']:.1f}), "
            f"{p['prefill_tokens']:,.0f} prefill tok; engine thread {p['engine_wall_s'] or p['wall_s']:.1f} s: busy {p['busy']:.0%} "
            f"deliver {p['deliver']:.0%} drain {p['drain']:.0%} idle {p['idle']:.0%} other {p['other']:.0%}")  # fmt: skip


def scrape(base: str) -> str:
    """The gateway's /metrics page."""
    r = httpx.get(f"{base}/metrics", timeout=10)
    r.raise_for_status()
    return r.text


def served(shape: str, workers: int, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Output tok/s of each level (stream, whole) and each level's profile (level_profile)."""
    config = {
        "server": {"host": "127.0.0.1", "access_log": False},
        "backends": [{"name": "gpu", "kind": "paged", "model": f"dummy:{shape}", "served_name": "m", "preload": True,
                      "options": {"device": args.device, "max_num_seqs": args.concurrency, "max_num_batched_tokens": 8192,
                                  "max_model_len": 4096}}],
    }  # fmt: skip
    name = f"{shape}-w{workers}"
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (workdir / f"{name}.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(args.port),
                               "--workers", str(workers)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    results: dict[str, float] = {}
    profiles: dict[str, dict[str, float]] = {}
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"turnout serve exited: {(workdir / f'{name}.log').read_text()[-3000:]}")
            time.sleep(1)
        # One round at full concurrency first, outside every profile: the load generators' own
        # warm-up runs at concurrency 4 and would fill a profile with small-batch steps.
        # Each level gets prompts of its own (seeds no other level uses): a prompt seen before
        # would come from the prefix cache, a prefill the offline run does in full.
        load(f"{base}/v1", False, args, workdir / f"{name}-warm", rounds=1)
        for level, mode in enumerate(("stream", "whole"), start=1):
            before, t0 = scrape(base), time.monotonic()
            samplers = sample_stacks(args.py_spy, server.pid, workdir / f"{name}-{mode}") if args.py_spy else []
            results[mode] = load(f"{base}/v1", mode == "stream", args, workdir / f"{name}-{mode}", seed_base=level * args.clients)
            time.sleep(SETTLE_S)
            after = scrape(base)
            profiles[mode] = level_profile(before, after, time.monotonic() - t0 - SETTLE_S)
            for sampler in samplers:
                sampler.wait(timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results, profiles


def sample_stacks(py_spy: str, server_pid: int, prefix: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy on the engine worker during a level (`--py-spy`, a diagnosis, not a figure):
    sampled for `PY_SPY_S` seconds without stopping it, each thread's stacks as collapsed text
    in PREFIX-<pid>.spy."""
    pids = subprocess.run(["pgrep", "-f", "--", "-m backends[.]worker "], capture_output=True, text=True).stdout.split()
    procs = []
    for pid in pids:
        if _descends(int(pid), server_pid):
            out = prefix.with_name(f"{prefix.name}-{pid}.spy")
            cmd = [py_spy, "record", "-p", pid, "-d", str(PY_SPY_S), "-r", "100", "-f", "raw", "--threads", "--nonblocking", "-o", str(out)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def load(url: str, stream: bool, args: argparse.Namespace, prefix: Path, rounds: int | None = None, seed_base: int = 0) -> float:
    """`--clients` load generators at once, `--concurrency` split between them, `rounds`
    (default `--rounds`) requests per client slot, no warm-up of their own; output tok/s =
    their tokens summed over the longest measured wall time. Generator i draws its prompts
    with seed `seed_base + i`."""
    width = args.concurrency // args.clients
    procs, reports = [], []
    for i in range(args.clients):
        report = prefix.with_name(f"{prefix.name}-c{i}.json")
        cmd = [sys.executable, "-m", "gateway.bench.serve", "--url", url, "--model", "m", "--endpoint", "completions",
               "--concurrency", str(width), "--requests", str(width * (rounds or args.rounds)), "--warmup", "0",
               "--max-tokens", str(args.output_len), "--prompt-tokens", str(args.input_len // 4), "--seed", str(seed_base + i),
               "--ignore-eos", "--timeout", "600", "--no-progress", "--json", str(report)] + (["--stream"] if stream else [])  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO))
        reports.append(report)
    for proc in procs:
        if proc.wait(timeout=900) != 0:
            raise RuntimeError(f"the load generator exited with {proc.returncode}")
    levels = [json.loads(r.read_text())["levels"][0] for r in reports]
    wall = max(lv["duration_s"] for lv in levels)
    return sum(lv["output_tokens_per_s"] * lv["duration_s"] for lv in levels) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--workers", default="1", help="HTTP process counts to serve with, e.g. 1,4")
    p.add_argument("--clients", type=int, default=1, help="load-generator processes sharing the concurrency")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = concurrency x rounds")
    p.add_argument("--offline-runs", type=int, default=2, help="offline runs per shape (the first repeat's); the best counts")
    p.add_argument("--repeats", type=int, default=1,
                   help="offline and served, interleaved, this many times per shape; reports medians (host speed drifts)")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (the dummy tokenizer is bytes: 4 per synthetic token)")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the program itself")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--py-spy", help="path of a py-spy binary: sample the engine worker's stacks during each level into --workdir")
    p.add_argument("--workdir", help="keep configs, logs and per-run reports here")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serve-vs-offline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for shape in args.shapes.split(","):
        for rep in range(args.repeats):
            # The first offline figure is the best of --offline-runs (the machine's first process
            # pays for cold caches); each later repeat runs offline once, beside its served levels.
            best = offline(shape, args, workdir / f"{shape}-r{rep}-offline.json", 1 if rep else args.offline_runs)
            engine, off = float(best["output_tok_s"]), offline_steps(best)
            for workers in map(int, args.workers.split(",")):
                http, profiles = served(shape, workers, args, workdir)
                rows.append({"shape": shape, "workers": workers, "clients": args.clients, "repeat": rep, "offline": engine, **http,
                             "offline_steps": off, "profile": profiles})  # fmt: skip
                print(f"{shape}, --workers {workers}{f', repeat {rep}' if args.repeats > 1 else ''}: offline {engine:,.0f} tok/s; "
                      f"served streamed {http['stream']:,.0f} ({http['stream'] / engine:.0%}), not streamed {http['whole']:,.0f} "
                      f"({http['whole'] / engine:.0%})", flush=True)  # fmt: skip
                for mode, prof in profiles.items():
                    print(profile_line(mode, prof, off), flush=True)
                write_report(args, rows)  # after each row: a run cut short keeps what it measured
    if args.repeats > 1:
        for row in summarize(rows):
            print(f"{row['shape']}, --workers {row['workers']}, median of {row['repeats']}: offline {row['offline']:,.0f}; "
                  f"streamed {row['stream']:,.0f} ({row['stream_ratio']:.0%} median of pairs, {row['stream_ratio_min']:.0%}-"
                  f"{row['stream_ratio_max']:.0%}), not streamed {row['whole']:,.0f} ({row['whole_ratio']:.0%}, "
                  f"{row['whole_ratio_min']:.0%}-{row['whole_ratio_max']:.0%})", flush=True)  # fmt: skip
        write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Every row so far, and with --repeats their medians, to --json (when given)."""
    if args.json:
        report = {"concurrency": args.concurrency, "rows": rows, "gpu": os.environ.get("GPU", "")}
        if args.repeats > 1:
            report["medians"] = summarize(rows)
        Path(args.json).write_text(json.dumps(report, indent=1))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over repeats, per shape and HTTP process count: of offline and of each served
    mode, and of each repeat's served/offline ratio (the pair measured minutes apart, so a
    host whose speed drifts over the call moves both), with that ratio's range."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["workers"]), []).append(row)
    out = []
    for (shape, workers), group in groups.items():
        summary: dict[str, Any] = {"shape": shape, "workers": workers, "repeats": len(group),
                                   "offline": statistics.median(r["offline"] for r in group)}  # fmt: skip
        for mode in ("stream", "whole"):
            ratios = [r[mode] / r["offline"] for r in group]
            summary |= {mode: statistics.median(r[mode] for r in group), f"{mode}_ratio": statistics.median(ratios),
                        f"{mode}_ratio_min": min(ratios), f"{mode}_ratio_max": max(ratios)}  # fmt: skip
        out.append(summary)
    return out

if __name__ == "__main__":
    main()
