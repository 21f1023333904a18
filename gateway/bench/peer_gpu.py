"""Benchmark (a program, not a test): the llama.cpp runner against the paged engine on one GPU,
the same random weights, both served by `turnout serve`, driven alike (issue 16, item 4).

This is the published Ollama-vs-vLLM table (N concurrent users, each sending non-streamed chat
requests of up to 256 tokens at temperature 0.7; output tok/s, mean and p99 latency, GPU
memory) reproduced inside one product: same contract, same GGUF, a different backend.

1. Random weights of a dummy shape (`--shape`, default llama3-8b) are written once as an F16
   GGUF (gateway/bench/random_gguf.py; reused when already there).
2. Two `turnout serve` processes on 127.0.0.1, one backend each: `kind: llamacpp` (all layers
   offloaded with `--llamacpp-n-gpu-layers -1`) and `kind: paged`. The llama.cpp one starts
   first and is warmed up, so that the paged engine, which sizes its KV pool from the memory
   still free, sees the runner's memory as taken. Both stay resident; the GPU they share is
   busy with one of them at a time.
3. For each level (`--levels`, default 1,10,50,256), each backend in turn gets a wave: that many
   users at once, each sending `--rounds` requests one after another. A wave that outlives its
   cap (`--level-cap-s`, and never past `--budget-s`) ends there: its unfinished requests are
   cancelled and counted as not completed, its tok/s counts the tokens of completed requests
   over the cap, and its latencies are of completed requests only (so a capped wave's p99 is
   marked as a lower bound). The runner serves one request per instance at a time, so at 256
   users most of a wave waits in its queue; the cap keeps the run inside a device call.
4. GPU memory: nvidia-smi per process (each server and its engine worker), the peak while the
   wave ran, and the whole GPU's; plus each backend's resident footprint right after it started.

Results go to stdout (a table) and, after every wave, to `--json`.

    python3 -m gateway.bench.peer_gpu --device cuda --json out/peer_gpu.json          # the GPU run
    python3 -m gateway.bench.peer_gpu --device cpu --shape smollm2-135m --levels 1,2 \\
        --max-tokens 8 --gguf /tmp/smollm2-f16.gguf --json /tmp/peer.json                # CPU smoke run

On a lent GPU machine, gateway/bench/device_peer.sh builds llama.cpp's CUDA backend and runs this.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.bench.harness import Server, start_server
from gateway.bench.random_gguf import write_random_gguf
from gateway.bench.serve import LevelSpec, Result, summarize

MODEL = "bench"  # the model id both servers answer to
RESERVE_S = 20.0  # kept back from --budget-s for stopping the servers and writing the results
MIN_WAVE_S = 10.0  # a wave is not started with less time than this left
IDLE_WAIT_S = 30.0  # after a capped wave, how long to wait for the backend's queue to drain
NOT_COMPLETED = "not completed within the wave's cap"

# Short, general chat prompts, one per request in turn (written for this benchmark).
PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between a virus and a bacterium?",
    "Describe the water cycle to a ten-year-old.",
    "Give me five tips for learning a new language as an adult.",
    "Why is the sky blue during the day and red at sunset?",
    "Summarize the history of the printing press in a few paragraphs.",
    "How do bridges carry heavy loads without collapsing?",
)

# What Ollama does by default, for the comparison (docs.ollama.com FAQ and context-length page,
# and the server's own log, as of Ollama 0.20): one request at a time per loaded model, a
# queue of 512, the context length by VRAM, every layer on the GPU when it fits.
OLLAMA_DEFAULTS = {
    "OLLAMA_NUM_PARALLEL": "1 (slots share one copy of the weights and are batched by llama.cpp's server)",
    "OLLAMA_MAX_QUEUE": 512,
    "OLLAMA_CONTEXT_LENGTH": "4k under 24 GiB of VRAM, 32k for 24-48 GiB, 256k from 48 GiB (capped by the model)",
    "num_batch": 512,
    "num_gpu": "every layer that fits",
}


# -- the two servers ----------------------------------------------------------------------------


def backend_configs(args: argparse.Namespace, gguf: Path) -> dict[str, dict[str, Any]]:
    """Each backend's config entry, by name, in start order (llama.cpp first: see the docstring)."""
    llama: dict[str, Any] = {
        "instances": args.llamacpp_instances,
        "max_queue": args.llamacpp_max_queue,
        "n_ctx": args.llamacpp_n_ctx,
        "n_batch": args.llamacpp_n_batch,
        "n_gpu_layers": args.llamacpp_n_gpu_layers if args.device != "cpu" else 0,
    }
    if args.llamacpp_threads:
        llama["n_threads"] = args.llamacpp_threads
    paged: dict[str, Any] = {
        "device": args.device,
        "max_num_seqs": args.paged_max_num_seqs,
        "max_num_batched_tokens": args.paged_max_num_batched_tokens,
        "max_model_len": args.paged_max_model_len,
    }
    if args.device == "cpu":  # the smoke run: a small pool, the engine's CPU defaults otherwise
        paged["kv_cache_gib"] = args.paged_kv_cache_gib
        if args.paged_threads:
            paged["num_threads"] = args.paged_threads
    else:
        paged["gpu_memory_utilization"] = args.paged_gpu_memory_utilization
    common = {"model": str(gguf), "served_name": MODEL, "preload": True, "keep_alive": -1}
    return {
        "llamacpp": {"name": "llamacpp", "kind": "llamacpp", **common, "options": llama},
        "paged": {"name": "paged", "kind": "paged", **common, "options": paged},
    }


def server_config(backend: dict[str, Any]) -> dict[str, Any]:
    """A policy with one backend and a route that never times a queued request out, never
    retries it and never ejects the backend: the runner's queue is the load being measured."""
    return {
        "server": {"host": "127.0.0.1", "access_log": False},
        "backends": [backend],
        "routes": [{
            "model": MODEL, "backends": [backend["name"]], "retries": {"max_retries": 0},
            "timeouts": {"first_token_s": 7200, "total_s": 7200},
        }],
        "circuit": {"failures": 1_000_000, "window_s": 1, "cooldown_s": 1},
    }  # fmt: skip


# -- GPU memory -----------------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (from /proc; an engine worker is the server's child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent pid is the 2nd field after the ")" that closes the command's name.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {pid}, [pid]
    while todo:  # bounded: each pid is visited once
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _smi(*query: str) -> list[list[str]] | None:
    """nvidia-smi's CSV answer to a query, or None where there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def gpu_used_mib() -> int | None:
    """Memory in use on GPU 0, MiB."""
    rows = _smi("--query-gpu=memory.used")
    return int(float(rows[0][0])) if rows else None


def process_mib() -> dict[int, int]:
    """GPU memory per process, MiB ({} where nvidia-smi lists none)."""
    out: dict[int, int] = {}
    for row in _smi("--query-compute-apps=pid,used_memory") or []:
        try:
            out[int(row[0])] = out.get(int(row[0]), 0) + int(float(row[1]))
        except (ValueError, IndexError):
            continue
    return out


class MemorySampler:
    """Samples GPU memory every `period_s` in a thread while a wave runs: the peak of the whole
    GPU and of the watched process tree. `stop()` ends it (the loop checks an event)."""

    def __init__(self, root_pid: int, period_s: float = 1.0) -> None:
        self.root_pid = root_pid
        self.period_s = period_s
        self.peak_total: int | None = None
        self.peak_process: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-memory", daemon=True)

    def _sample(self) -> None:
        total = gpu_used_mib()
        if total is not None:
            self.peak_total = max(self.peak_total or 0, total)
        per_pid = process_mib()
        if per_pid:
            mine = sum(mib for pid, mib in per_pid.items() if pid in descendants(self.root_pid))
            self.peak_process = max(self.peak_process or 0, mine)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemorySampler:
        if shutil.which("nvidia-smi") is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
            self._sample()  # one more after the wave: the pools a wave grew stay allocated


# -- a wave of users ------------------------------------------------------------------------------


def request_body(index: int, args: argparse.Namespace) -> bytes:
    """One non-streamed chat request, bench_llm.py style."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
    }
    if args.ignore_eos:  # every answer exactly max_tokens long on both backends
        body["ignore_eos"] = True
    return json.dumps(body).encode()


async def _send(session: Any, url: str, body: bytes, deadline: float) -> Result:
    """One request, given up (and so cancelled at the server, which sees the disconnect) at
    the wave's deadline."""
    import aiohttp

    start = time.perf_counter()
    result = Result(ok=False, status=0, start=start)
    try:
        timeout = aiohttp.ClientTimeout(total=max(0.001, deadline - start))
        async with session.post(url, data=body, headers={"content-type": "application/json"}, timeout=timeout) as response:
            result.status = response.status
            payload = await response.read()
        result.ttft = time.perf_counter() - start
        if result.status == 200:
            result.output_tokens = int((json.loads(payload).get("usage") or {}).get("completion_tokens") or 0)
            result.ok = True
        else:
            result.error = f"HTTP {result.status}: {payload[:120]!r}"
    except asyncio.TimeoutError:
        result.error = NOT_COMPLETED
    except Exception as exc:  # connection refused or reset: the request failed
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    result.e2e = time.perf_counter() - start
    return result


async def wave(base_url: str, users: int, rounds: int, cap_s: float, args: argparse.Namespace, first_prompt: int = 0) -> dict[str, Any]:
    """`users` clients at once, each sending `rounds` requests in turn, all ended by `cap_s`."""
    import aiohttp

    url = base_url + "/v1/chat/completions"
    results: list[Result] = []
    started = time.perf_counter()
    deadline = started + cap_s
    connector = aiohttp.TCPConnector(limit=max(1, users))

    async with aiohttp.ClientSession(connector=connector) as session:

        async def user(u: int) -> None:
            for r in range(rounds):
                if time.perf_counter() >= deadline:
                    return
                results.append(await _send(session, url, request_body(first_prompt + u * rounds + r, args), deadline))

        await asyncio.gather(*(user(u) for u in range(users)))
    wall = time.perf_counter() - started
    summary = summarize(LevelSpec("concurrency", users, users * rounds, cap_s), results, wall)
    summary["capped"] = any(r.error == NOT_COMPLETED for r in results) or len(results) < users * rounds
    return summary


def wave_share(left_s: float, name: str, waves_left: dict[str, int]) -> float:
    """The seconds a wave of backend `name` may take out of `left_s`: an even share among that
    backend's remaining waves, after setting aside MIN_WAVE_S for each remaining wave of the
    others. Only the runner's waves run long (it queues); the paged engine's take seconds, so
    planning them at the minimum leaves their time to the runner, and what a wave leaves unused
    goes to the waves after it."""
    others = sum(n for other, n in waves_left.items() if other != name)
    return max(MIN_WAVE_S, (left_s - MIN_WAVE_S * others) / max(1, waves_left[name]))


def wait_idle(server: Server, timeout_s: float) -> bool:
    """Wait until the server reports nothing running or waiting (its /metrics); False if it
    still had work after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = httpx.get(server.url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        busy = 0.0
        for line in text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                busy += float(line.rsplit(" ", 1)[-1])
        if text and busy == 0:
            return True
        time.sleep(0.5)
    return False


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything measured, written to --json after each step."""

    settings: dict[str, Any]
    machine: dict[str, Any]
    gguf: dict[str, Any] = field(default_factory=dict)
    startup: dict[str, Any] = field(default_factory=dict)
    waves: list[dict[str, Any]] = field(default_factory=list)
    ollama_defaults: dict[str, Any] = field(default_factory=lambda: dict(OLLAMA_DEFAULTS))
    notes: list[str] = field(default_factory=list)

    def save(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(self), indent=1))


def machine() -> dict[str, Any]:
    """GPU, driver and library versions, for the record."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    rows = _smi("--query-gpu=name,memory.total,driver_version")
    if rows:
        info["gpu"], info["gpu_memory_mib"], info["driver"] = rows[0][0], rows[0][1], rows[0][2]
    for dist in ("torch", "llama_cpp_python", "gguf", "triton"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # reported, not fatal: the servers import them, not we
            info[dist] = None
    return info


def row(w: dict[str, Any]) -> str:
    """One line of the result table."""
    if w.get("skipped"):
        return f"| {w['backend']} | {w['users']} | skipped: {w['skipped']} | | | | | |"
    mean, p99 = w["e2e_ms"]["mean"], w["e2e_ms"]["p99"]
    p99_text = "-" if p99 is None else (">=" if w["capped"] else "") + f"{p99 / 1000:.2f}"
    return (
        f"| {w['backend']} | {w['users']} | {w['ok']}/{w['requests_planned']} | {w['output_tokens_per_s']:,.1f} "
        f"| {'-' if mean is None else f'{mean / 1000:.2f}'} | {p99_text} "
        f"| {w.get('gpu_mib_process_peak') or '-'} | {w.get('gpu_mib_total_peak') or '-'} |"
    )


HEADER = (
    "| backend | users | completed | output tok/s | mean latency s | p99 latency s | GPU MiB (its processes, peak) | GPU MiB (whole GPU, peak) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def footprint(server: Server) -> tuple[int | None, int | None]:
    """(MiB in use on the whole GPU, MiB held by the server's processes), None where unknown."""
    time.sleep(1.0)  # let nvidia-smi catch up with the last allocations
    own = sum(mib for pid, mib in process_mib().items() if pid in descendants(server.process.pid))
    return gpu_used_mib(), own or None


def start(name: str, backend: dict[str, Any], workdir: Path, run: Run, timeout_s: float) -> Server:
    """Start one server and record how long it took and what it holds on the GPU."""
    before = gpu_used_mib()
    t0 = time.perf_counter()
    server = start_server(server_config(backend), workdir, ready_timeout_s=timeout_s)
    ready_s = time.perf_counter() - t0
    after, own = footprint(server)
    run.startup[name] = {"ready_s": round(ready_s, 1), "gpu_mib_before": before, "gpu_mib_after": after,
                         "gpu_mib_process": own, "log": str(server.log)}  # fmt: skip
    print(f"{name}: ready in {ready_s:.1f} s; GPU MiB {before} -> {after} (its processes: {own})", flush=True)
    return server


def offload_check(name: str, run: Run, gguf_bytes: int, args: argparse.Namespace) -> str | None:
    """A note when the runner seems not to hold the weights on the GPU (a llama_cpp built
    without CUDA offloads nothing, silently): its memory grew by less than half the GGUF."""
    if name != "llamacpp" or args.device == "cpu" or args.llamacpp_n_gpu_layers == 0:
        return None
    startup = run.startup[name]
    own = startup.get("gpu_mib_process_after_warmup")
    if own is None and None not in (startup.get("gpu_mib_after_warmup"), startup.get("gpu_mib_before")):
        own = startup["gpu_mib_after_warmup"] - startup["gpu_mib_before"]
    if own is not None and own * 2**20 < gguf_bytes / 2:
        return f"the llama.cpp runner holds {own} MiB on the GPU for a {gguf_bytes / 2**20:.0f} MiB GGUF: its layers are not offloaded"
    return None


def warm_up(name: str, server: Server, args: argparse.Namespace, users: int, cap_s: float) -> None:
    """A few short requests: kernels compiled and graphs captured before anything is timed."""
    short = argparse.Namespace(**{**vars(args), "max_tokens": min(8, args.max_tokens)})
    for n in (1, users):
        result = asyncio.run(wave(server.url, n, 1, cap_s, short, first_prompt=3))
        if result["ok"] == 0:
            raise RuntimeError(f"{name}: the warm-up got no answer: {result['errors']}; see {server.log}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", help="dummy shape of the random weights (backends/paged/config.py)")
    p.add_argument("--gguf", type=Path, help="where the GGUF is (written there unless already complete); default: in the work dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the program itself")
    p.add_argument("--backends", default="paged,llamacpp", help="which to run, in each level's order")
    p.add_argument("--levels", default="1,10,50,256", help="users per wave")
    p.add_argument("--rounds", type=int, default=1, help="requests each user sends in turn")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let answers end at EOS (by default every answer is max_tokens long on both backends)")
    p.add_argument("--level-cap-s", type=float, default=120.0, help="a wave ends after this many seconds")
    p.add_argument("--budget-s", type=float, default=0.0, help="the whole run ends within this many seconds (0: no limit)")
    p.add_argument("--warmup-cap-s", type=float, default=120.0)
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--llamacpp-instances", type=int, default=1, help="Llama instances (each a copy of the weights, one request at a time)")
    p.add_argument("--llamacpp-max-queue", type=int, default=512, help="Ollama's OLLAMA_MAX_QUEUE default")
    p.add_argument("--llamacpp-n-ctx", type=int, default=4096)
    p.add_argument("--llamacpp-n-batch", type=int, default=512)
    p.add_argument("--llamacpp-n-gpu-layers", type=int, default=-1, help="-1: every layer (ignored on --device cpu)")
    p.add_argument("--llamacpp-threads", type=int, help="CPU threads per instance (default: every core)")
    p.add_argument("--paged-max-num-seqs", type=int, default=256)
    p.add_argument("--paged-max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--paged-max-model-len", type=int, default=4096)
    p.add_argument("--paged-gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--paged-kv-cache-gib", type=float, default=0.25, help="CPU only")
    p.add_argument("--paged-threads", type=int, help="CPU only: torch threads")
    p.add_argument("--workdir", type=Path, help="configs and server logs (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="write every figure here (rewritten after each wave)")
    args = p.parse_args()
    # `timeout` (the device script's) sends SIGTERM: unwind, so the finally below stops the
    # servers and saves what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    deadline = t0 + args.budget_s if args.budget_s > 0 else float("inf")
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    names = [x.strip() for x in args.backends.split(",") if x.strip()]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peer-gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or workdir / f"{args.shape}-f16.gguf"
    run = Run(settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, machine=machine())

    written = write_random_gguf(gguf, args.shape, args.seed)
    run.gguf = {"path": str(gguf), **asdict(written)}
    print(f"GGUF {gguf}: {written.bytes / 2**30:.2f} GiB ({written.seconds:.1f} s to write; 0: reused)", flush=True)
    configs = backend_configs(args, gguf)
    run.settings["backend_configs"] = configs
    run.save(args.json)

    servers: dict[str, Server] = {}
    try:
        for name in [n for n in ("llamacpp", "paged") if n in names]:  # this order: see the module docstring
            try:
                timeout = min(args.ready_timeout_s, deadline - time.monotonic() - RESERVE_S)
                servers[name] = start(name, configs[name], workdir, run, timeout)
                t_warm = time.perf_counter()
                # The runner takes one request per instance; the engine gets the largest wave's
                # batch, so that nothing is compiled or captured during a timed wave.
                warm_cap = min(args.warmup_cap_s, max(MIN_WAVE_S, deadline - time.monotonic() - RESERVE_S))
                warm_up(name, servers[name], args, args.llamacpp_instances if name == "llamacpp" else max(levels), warm_cap)
            except Exception as exc:  # one backend failing to come up still leaves the other's figures
                if name in servers:
                    servers.pop(name).stop()
                names.remove(name)
                note = f"{name} did not come up: {type(exc).__name__}: {str(exc)[-2000:]}"
                run.notes.append(note)
                print(f"ERROR: {note}", flush=True)
                run.save(args.json)
                continue
            total, own = footprint(servers[name])
            run.startup[name].update(warmup_s=round(time.perf_counter() - t_warm, 1), gpu_mib_after_warmup=total,
                                     gpu_mib_process_after_warmup=own)  # fmt: skip
            print(f"{name}: warmed up in {time.perf_counter() - t_warm:.1f} s; GPU MiB {total} (its processes: {own})", flush=True)
            if note := offload_check(name, run, written.bytes, args):
                run.notes.append(note)
                print(f"WARNING: {note}", flush=True)
            run.save(args.json)
        print("\n" + HEADER, flush=True)
        waves_left = {name: len(levels) for name in names}
        for users in levels:
            for name in names:
                left = deadline - time.monotonic() - RESERVE_S
                planned = users * args.rounds
                if left < MIN_WAVE_S:
                    entry: dict[str, Any] = {"backend": name, "users": users, "requests_planned": planned, "skipped": "out of time"}
                else:
                    cap = min(args.level_cap_s, wave_share(left, name, waves_left))
                    with MemorySampler(servers[name].process.pid) as mem:
                        entry = {"backend": name, "users": users, "requests_planned": planned, "cap_s": round(cap, 1),
                                 **asyncio.run(wave(servers[name].url, users, args.rounds, cap, args))}  # fmt: skip
                    entry["gpu_mib_process_peak"], entry["gpu_mib_total_peak"] = mem.peak_process, mem.peak_total
                    if entry["capped"]:
                        entry["idle_after_cap"] = wait_idle(servers[name], min(IDLE_WAIT_S, max(1.0, deadline - time.monotonic() - RESERVE_S)))
                waves_left[name] -= 1
                run.waves.append(entry)
                run.save(args.json)
                print(row(entry), flush=True)
    finally:
        for server in servers.values():
            server.stop()
        run.save(args.json)
    print(f"\nllama.cpp runner: {args.llamacpp_instances} instance(s), n_ctx {args.llamacpp_n_ctx}, n_batch {args.llamacpp_n_batch}, "
          f"max_queue {args.llamacpp_max_queue}, n_gpu_layers {configs['llamacpp']['options']['n_gpu_layers']}; "
          f"{args.rounds} request(s) per user, {args.max_tokens} max tokens, temperature {args.temperature}, "
          f"ignore_eos {args.ignore_eos}; total {time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    done = [w for w in run.waves if not w.get("skipped")]
    return 0 if done and all(w["ok"] > 0 for w in done) else 1


if __name__ == "__main__":
    sys.exit(main())
