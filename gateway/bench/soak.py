"""Benchmark (a program, not a test): the gateway's memory over a bounded soak.

A `turnout serve` (one process: API keys from a file store, in-process RPM/TPM limits,
Prometheus metrics, the JSON access log, trusted proxies) with a remote backend on the fake
upstream (gateway/bench/fake_upstream.py, tokens at once), both on loopback. A closed loop of
`--concurrency` keep-alive connections sends `--requests` requests (default a million):
chat and text completions, half of them streamed, a share with an X-Forwarded-For header,
and 1% for an unknown model (a 404 is the right answer: error paths must not leak either).
Every `--sample-every` requests it reads the gateway's VmRSS (and thread and descriptor
counts) from /proc, and the same for the fake upstream, the peer measured in the same run:
a minimal Python server handling the same requests, so its curve is the floor of what the
interpreter and allocator do on their own.

    .venv/bin/python -m gateway.bench.soak [--requests 1000000] [--concurrency 16]
        [--sample-every 10000] [--warmup 50000] [--json out/soak.json]

It prints a table and a summary (RSS growth from the end of the warm-up to the end, the
slope over that span, errors), writes the JSON, and exits by itself: 0 when no answer was
wrong, 1 otherwise. The client is raw asyncio HTTP/1.1 on uvloop, so that the load
generator takes as little of the shared cores as it can.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.bench.harness import REPO, Server, free_port, start_server
from gateway.bench.machine import cpu_name
from gateway.keys import FileKeyStore, new_key

MODEL = "fake"
HUGE = 10**12  # limits that never deny: the limiter still runs on every request
STALL_S = 60.0  # no request finished for this long: the run is stuck, stop and say so


# -- the processes -----------------------------------------------------------------------------


def start_upstream(port: int, log: Path) -> subprocess.Popen[bytes]:
    """The fake upstream, ready (its /healthz answers)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.bench.fake_upstream", "--port", str(port), "--model", MODEL],
        cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the fake upstream exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the fake upstream did not start")


def gateway_config(upstream_url: str, keys: Path) -> dict[str, Any]:
    """The production path over a remote backend: keys, limits, metrics, access log."""
    return {
        "server": {"host": "127.0.0.1", "access_log": True, "trusted_proxies": ["127.0.0.1"]},
        "auth": {"store": "file", "path": str(keys)},
        "limits": {"key": {"rpm": HUGE, "tpm": HUGE}, "tenant": {"rpm": HUGE, "tpm": HUGE}},
        "backends": [{"name": "up", "kind": "remote", "model": MODEL, "url": upstream_url, "options": {"max_connections": 64}}],
        "routes": [{"model": MODEL, "backends": ["up"], "admission": {"limit": 256, "max_queue": 512}}],
    }


@dataclass
class ProcStat:
    """What /proc says of one process: resident memory (KiB), threads, open descriptors."""

    rss_kib: int
    threads: int
    fds: int


def proc_stat(pid: int) -> ProcStat:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return ProcStat(int(fields["VmRSS"].split()[0]), int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd")))


# -- the requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One request, as bytes, and the answer it must get."""

    data: bytes
    kind: str  # chat | completions | unknown-model
    stream: bool
    status: int


def _request(port: int, key: str, path: str, body: dict[str, Any], forwarded: str | None) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n"
    )
    if forwarded:
        head += f"x-forwarded-for: {forwarded}\r\n"
    return (head + "\r\n").encode() + payload


def plan(port: int, key: str, variants: int = 400) -> list[Planned]:
    """`variants` requests to cycle through: chat and completions, streamed or not (half),
    distinct prompts, every third with an X-Forwarded-For; the last few in every hundred for
    an unknown model (1%)."""
    out: list[Planned] = []
    for i in range(variants):
        stream = i % 2 == 1
        chat = i % 4 < 2
        forwarded = f"198.51.100.{i % 250 + 1}" if i % 3 == 0 else None
        model = MODEL if i % 100 != 99 else "no-such-model"
        body: dict[str, Any] = {"model": model, "max_tokens": 16}
        if chat:
            body["messages"] = [{"role": "user", "content": f"soak {i}: tell me something"}]
        else:
            body["prompt"] = f"soak {i}: once upon a time"
        if stream:
            body["stream"] = True
        path = "/v1/chat/completions" if chat else "/v1/completions"
        kind = "unknown-model" if model != MODEL else ("chat" if chat else "completions")
        out.append(Planned(_request(port, key, path, body, forwarded), kind, stream, 404 if model != MODEL else 200))
    return out


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep-alive) of one HTTP/1.1 answer: Content-Length or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    keep = b"\r\nconnection: close" not in lower
    if b"\r\ntransfer-encoding: chunked" in lower:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers: the blank line
                break
            parts.append((await reader.readexactly(size + 2))[:-2])
        return status, b"".join(parts), keep
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError("an answer with neither content-length nor chunks")
    length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
    return status, await reader.readexactly(length), keep


def wrong(planned: Planned, status: int, body: bytes) -> str | None:
    """Why this answer is not the expected one, or None."""
    if status != planned.status:
        return f"{planned.kind}: HTTP {status} (expected {planned.status}): {body[:200]!r}"
    if status != 200:
        return None if b'"error"' in body else f"{planned.kind}: HTTP {status} without an error body"
    if planned.stream:
        return None if body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body else f"{planned.kind} stream: {body[-200:]!r}"
    return None if b'"usage"' in body else f"{planned.kind}: no usage in {body[:200]!r}"


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Sample:
    """The state after `requests` answers."""

    requests: int
    elapsed_s: float
    requests_per_s: float  # over the interval since the previous sample
    p50_ms: float
    p99_ms: float
    gateway: ProcStat
    upstream: ProcStat
    client_rss_kib: int
    errors: int


@dataclass
class Soak:
    """The closed loop's shared state."""

    planned: list[Planned]
    total: int
    sample_every: int
    gateway_pid: int
    upstream_pid: int
    max_seconds: float
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    last_progress: float = field(default_factory=time.monotonic)
    stop_reason: str | None = None
    _interval_start: float = 0.0
    _next: itertools.count[int] = field(default_factory=itertools.count)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(text)

    def finished_one(self, seconds: float) -> None:
        self.done += 1
        self.latencies.append(seconds)
        self.last_progress = time.monotonic()
        if self.done % self.sample_every == 0 or self.done == self.total:
            self.sample()

    def sample(self) -> None:
        now = time.perf_counter()
        lat = sorted(self.latencies)
        interval = now - (self._interval_start or self.started)
        previous = self.samples[-1].requests if self.samples else 0
        self.samples.append(
            Sample(
                requests=self.done,
                elapsed_s=round(now - self.started, 2),
                requests_per_s=round((self.done - previous) / interval, 1) if interval > 0 else 0.0,
                p50_ms=round(lat[len(lat) // 2] * 1000, 3) if lat else 0.0,
                p99_ms=round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3) if lat else 0.0,
                gateway=proc_stat(self.gateway_pid),
                upstream=proc_stat(self.upstream_pid),
                client_rss_kib=proc_stat(os.getpid()).rss_kib,
                errors=self.errors,
            )
        )
        self.latencies = []
        self._interval_start = now
        last = self.samples[-1]
        print(
            f"  {last.requests:,}/{self.total:,} {last.requests_per_s:.0f} req/s, gateway RSS "
            f"{last.gateway.rss_kib / 1024:.1f} MiB, upstream {last.upstream.rss_kib / 1024:.1f} MiB, errors {self.errors}",
            file=sys.stderr,
            flush=True,
        )  # progress: a long run shows it is alive

    def take(self) -> int | None:
        """The next request's number, or None when the run is over."""
        if self.stop_reason is not None:
            return None
        i = next(self._next)
        if i >= self.total:
            return None
        if self.max_seconds and time.perf_counter() - self.started > self.max_seconds:
            self.stop_reason = f"--max-seconds {self.max_seconds:g} reached"
            return None
        return i


async def connection(soak: Soak, port: int) -> None:
    """One closed-loop client: a keep-alive connection, the next request when one ends."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while (i := soak.take()) is not None:
        planned = soak.planned[i % len(soak.planned)]
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            writer.write(planned.data)
            status, body, keep = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            soak.error(f"{planned.kind}: {type(exc).__name__}: {exc}"[:300])
            if writer is not None:
                writer.close()
            reader = writer = None
            soak.finished_one(time.perf_counter() - start)
            continue
        problem = wrong(planned, status, body)
        if problem is not None:
            soak.error(problem)
        if not keep:
            writer.close()
            reader = writer = None
        soak.finished_one(time.perf_counter() - start)
    if writer is not None:
        writer.close()


async def watchdog(soak: Soak, clients: list[asyncio.Task[None]]) -> None:
    """Stop a run in which nothing finishes any more (a stalled gateway) rather than hang."""
    while not all(c.done() for c in clients):
        await asyncio.sleep(min(5.0, STALL_S / 2))
        if soak.stop_reason is None and time.monotonic() - soak.last_progress > STALL_S:
            soak.stop_reason = f"no answer for {STALL_S:g} s"
            soak.error(soak.stop_reason)
            for client in clients:
                client.cancel()
            return


async def run(soak: Soak, port: int, concurrency: int) -> None:
    """The closed loop, from a first sample (the processes as they started) to a last."""
    soak.sample()
    soak.samples[-1].requests_per_s = 0.0
    clients = [asyncio.create_task(connection(soak, port)) for _ in range(concurrency)]
    guard = asyncio.create_task(watchdog(soak, clients))
    results = await asyncio.gather(*clients, return_exceptions=True)
    guard.cancel()
    if soak.samples[-1].requests != soak.done:
        soak.sample()  # stopped early: the state at the stop
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


# -- the report --------------------------------------------------------------------------------


def slope_kib_per_100k(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of RSS (KiB) over requests, per 100,000 requests."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in points) / var * 100_000


def summary(samples: list[Sample], warmup: int) -> dict[str, Any]:
    """RSS growth from the first sample at or after the warm-up to the last one, per process."""
    after = [s for s in samples if s.requests >= warmup] or samples[-1:]
    base, end = after[0], samples[-1]
    out: dict[str, Any] = {"baseline_at_requests": base.requests, "end_at_requests": end.requests}
    for name, get in (("gateway", lambda s: s.gateway.rss_kib), ("upstream", lambda s: s.upstream.rss_kib), ("client", lambda s: s.client_rss_kib)):
        values = [get(s) for s in after]
        out[name] = {
            "rss_start_mib": round(get(samples[0]) / 1024, 1),
            "rss_baseline_mib": round(get(base) / 1024, 1),
            "rss_end_mib": round(get(end) / 1024, 1),
            "rss_max_after_warmup_mib": round(max(values) / 1024, 1),
            "growth_mib": round((get(end) - get(base)) / 1024, 2),
            "growth_pct": round(100 * (get(end) - get(base)) / get(base), 2) if get(base) else 0.0,
            "slope_kib_per_100k_requests": round(slope_kib_per_100k([(s.requests, get(s)) for s in after]), 1),
        }
    out["gateway"]["threads_baseline_end"] = [base.gateway.threads, end.gateway.threads]
    out["gateway"]["fds_baseline_end"] = [base.gateway.fds, end.gateway.fds]
    return out


def table(samples: list[Sample], rows: int = 25) -> str:
    """About `rows` evenly spaced samples (always the first and the last)."""
    step = max(1, (len(samples) - 1) // max(1, rows - 1))
    chosen = samples[::step]
    if chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    lines = [
        "| requests | elapsed (s) | req/s | p50 (ms) | p99 (ms) | gateway RSS (MiB) | threads | fds | upstream RSS (MiB) | client RSS (MiB) | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in chosen:
        lines.append(
            f"| {s.requests:,} | {s.elapsed_s:.0f} | {s.requests_per_s:.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} | "
            f"{s.gateway.rss_kib / 1024:.1f} | {s.gateway.threads} | {s.gateway.fds} | {s.upstream.rss_kib / 1024:.1f} | "
            f"{s.client_rss_kib / 1024:.1f} | {s.errors} |"
        )
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000, help="how many requests in all (default 1,000,000)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop connections (default 16)")
    parser.add_argument("--sample-every", type=int, default=0, help="requests between RSS samples (default: requests / 100)")
    parser.add_argument("--warmup", type=int, default=-1, help="requests before the baseline sample (default: 5%% of --requests)")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop early after this long, and say so (0: never)")
    parser.add_argument("--json", help="write the samples and the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, logs)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    sample_every = args.sample_every or max(1, args.requests // 100)
    warmup = args.warmup if args.warmup >= 0 else args.requests // 20

    work = Path(tempfile.mkdtemp(prefix="turnout-soak-"))
    keys = work / "keys.json"
    secret, record = new_key("soak", tenant="soak")
    FileKeyStore(keys).add(record)
    up_port = free_port()
    upstream = start_upstream(up_port, work / "upstream.log")
    gateway: Server | None = None
    try:
        gateway = start_server(gateway_config(f"http://127.0.0.1:{up_port}/v1", keys), work, env={"TURNOUT_HOME": str(work)})
        soak = Soak(plan(gateway.port, secret), args.requests, sample_every, gateway.process.pid, upstream.pid, args.max_seconds)
        print(
            f"soak: {args.requests:,} requests, concurrency {args.concurrency}, a sample every {sample_every:,}, "
            f"baseline after {warmup:,}; gateway pid {gateway.process.pid}, work dir {work}",
            file=sys.stderr,
            flush=True,
        )
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(run(soak, gateway.port, args.concurrency))
        server_errors = sum(1 for line in gateway.log.open(errors="replace") if " ERROR " in line or line.startswith("Traceback"))
    finally:
        if gateway is not None:
            gateway.stop()
        if upstream.poll() is None:
            os.killpg(upstream.pid, signal.SIGTERM)
            upstream.wait(timeout=10)

    result = {
        "machine": machine(),
        "command": " ".join(["python -m gateway.bench.soak", *(argv if argv is not None else sys.argv[1:])]),
        "requests": args.requests,
        "answered": soak.done,
        "concurrency": args.concurrency,
        "sample_every": sample_every,
        "warmup": warmup,
        "elapsed_s": soak.samples[-1].elapsed_s,
        "mean_requests_per_s": round(soak.done / soak.samples[-1].elapsed_s, 1) if soak.samples[-1].elapsed_s else 0.0,
        "errors": soak.errors,
        "error_examples": soak.error_examples,
        "server_error_lines": server_errors,
        "stopped_early": soak.stop_reason,
        "summary": summary(soak.samples, warmup),
        "samples": [asdict(s) for s in soak.samples],
    }
    print(f"machine: {result['machine']}")
    print(table(soak.samples))
    s = result["summary"]
    for name in ("gateway", "upstream", "client"):
        p = s[name]
        print(
            f"{name}: RSS {p['rss_start_mib']} MiB at start, {p['rss_baseline_mib']} MiB after {s['baseline_at_requests']:,} requests, "
            f"{p['rss_end_mib']} MiB after {s['end_at_requests']:,}: growth {p['growth_mib']:+.2f} MiB ({p['growth_pct']:+.2f}%), "
            f"slope {p['slope_kib_per_100k_requests']:+.1f} KiB per 100k requests"
        )
    print(
        f"answered {soak.done:,} of {args.requests:,} in {result['elapsed_s']:.0f} s ({result['mean_requests_per_s']:.0f} req/s); "
        f"wrong answers {soak.errors}; ERROR lines in the gateway's log {server_errors}"
        + (f"; stopped early: {soak.stop_reason}" if soak.stop_reason else "")
    )
    for example in soak.error_examples:
        print(f"  {example}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.keep:
        print(f"work dir kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    ok = soak.errors == 0 and server_errors == 0 and soak.stop_reason is None and soak.done == args.requests
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
