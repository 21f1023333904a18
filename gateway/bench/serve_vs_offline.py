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

    python3 -m gateway.bench.serve_vs_offline --shapes smollm2-135m,llama3-8b --workers 1,4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]


def offline(shape: str, args: argparse.Namespace, out: Path) -> float:
    """The best of `--offline-runs` runs: the first process on a fresh machine pays for cold
    kernel caches (docs/benchmarks.md, "Paged engine on GPU")."""
    return max(_offline_once(shape, args, out.with_suffix(f".{i}.json")) for i in range(args.offline_runs))


def _offline_once(shape: str, args: argparse.Namespace, out: Path) -> float:
    cmd = [sys.executable, "-m", "gateway.bench.engine", "--shape", shape, "--no-transformers", "--num-requests", str(args.concurrency),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--device", args.device, "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, timeout=900)
    return float(json.loads(out.read_text())["engine"]["output_tok_s"])


def served(shape: str, workers: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
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
        for mode in ("stream", "whole"):
            results[mode] = load(f"http://127.0.0.1:{args.port}/v1", mode == "stream", args, workdir / f"{name}-{mode}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results


def load(url: str, stream: bool, args: argparse.Namespace, prefix: Path) -> float:
    """`--clients` load generators at once, `--concurrency` split between them; output
    tok/s = their tokens summed over the longest measured wall time."""
    width = args.concurrency // args.clients
    procs, reports = [], []
    for i in range(args.clients):
        report = prefix.with_name(f"{prefix.name}-c{i}.json")
        cmd = [sys.executable, "-m", "gateway.bench.serve", "--url", url, "--model", "m", "--endpoint", "completions",
               "--concurrency", str(width), "--requests", str(width * args.rounds), "--warmup", str(width),
               "--max-tokens", str(args.output_len), "--prompt-tokens", str(args.input_len // 4), "--seed", str(i),
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
    p.add_argument("--offline-runs", type=int, default=2, help="offline runs per shape; the best counts")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (the dummy tokenizer is bytes: 4 per synthetic token)")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the program itself")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--workdir", help="keep configs, logs and per-run reports here")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serve-vs-offline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        engine = offline(shape, args, workdir / f"{shape}-offline.json")
        for workers in map(int, args.workers.split(",")):
            http = served(shape, workers, args, workdir)
            rows.append({"shape": shape, "workers": workers, "clients": args.clients, "offline": engine, **http})
            print(f"{shape}, --workers {workers}: offline {engine:,.0f} tok/s; served streamed {http['stream']:,.0f} "
                  f"({http['stream'] / engine:.0%}), not streamed {http['whole']:,.0f} ({http['whole'] / engine:.0%})", flush=True)  # fmt: skip
            if args.json:  # after each row: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps({"concurrency": args.concurrency, "rows": rows, "gpu": os.environ.get("GPU", "")}, indent=1))


if __name__ == "__main__":
    main()
