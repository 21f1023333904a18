"""`turnout bench serve`: a load generator for any OpenAI-compatible server.

Closed loop (`--concurrency 1,4,16`: that many clients, each sending its next request when
the last one ends) or open loop (`--rate 50,100`: requests start on a Poisson clock whatever
the answers do), each level bounded by `--requests` and `--duration`. Prompts are synthetic
(`--prompt-tokens`, about 4 characters a token) or a JSONL file (`--prompts`: one object a
line with `messages` or `prompt`, and optionally `max_tokens`). Per level it reports
percentiles of time to first token, inter-token latency and end-to-end latency, requests/s
and output tokens/s; as JSON (`--json`), a PNG of the sweep (`--plot`) and a table.

    turnout bench serve --url http://127.0.0.1:8080/v1 --model smollm2-135m --api-key $KEY \
        --concurrency 1,2,4,8,16,32 --requests 500 --stream --json out.json --plot out.png

Streamed, every SSE event with text counts as a token (the usage chunk's count wins when the
server sends one); not streamed, TTFT is the whole answer's time and tokens come from usage.
aiohttp is the client when installed (less CPU per request than httpx, which matters when
the load generator shares cores with the server it measures); httpx otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_REQUESTS_PER_LEVEL = 1_000_000
MAX_DURATION_S = 3600.0
PERCENTILES = (50, 90, 99)


# -- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One request body's variable part."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None


def synthetic_prompts(n: int, prompt_tokens: int, seed: int = 0) -> list[Prompt]:
    """`n` distinct prompts of about `prompt_tokens` tokens (4 characters a token), so no
    prefix cache sees the same text twice at the start."""
    rng = random.Random(seed)
    words = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
    out = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(max(1, prompt_tokens * 4 // 6)))
        out.append(Prompt(messages=[{"role": "user", "content": f"{i}: {body}"}], prompt=f"{i}: {body}"))
    return out


def load_prompts(path: Path) -> list[Prompt]:
    """A JSONL prompt set: `{"messages": [...]}` or `{"prompt": "..."}`, `max_tokens` optional."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        messages, prompt = row.get("messages"), row.get("prompt")
        if messages is None and prompt is None:
            raise ValueError(f"{path}:{number}: needs `messages` or `prompt`")
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        if prompt is None:
            prompt = "\n".join(str(m.get("content", "")) for m in messages)
        prompts.append(Prompt(messages=messages, prompt=prompt, max_tokens=row.get("max_tokens")))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def request_body(prompt: Prompt, *, model: str, endpoint: str, stream: bool, max_tokens: int, ignore_eos: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "max_tokens": prompt.max_tokens or max_tokens, "temperature": 0}
    if ignore_eos:  # vLLM's extension: every answer is exactly max_tokens long (random weights)
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = prompt.messages
    else:
        body["prompt"] = prompt.prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


# -- one request -------------------------------------------------------------------------------


@dataclass
class Result:
    """One request's timings (seconds from its start) and tokens."""

    ok: bool
    status: int
    start: float
    e2e: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def _count_event(data: bytes) -> tuple[int, int | None]:
    """(text events in this SSE data line: 0 or 1, usage completion_tokens or None)."""
    if data.startswith(b"[DONE]"):
        return 0, None
    try:
        obj = json.loads(data)
    except ValueError:
        return 0, None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    for choice in obj.get("choices") or () if isinstance(obj, dict) else ():
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if text:
            return 1, tokens
    return 0, tokens


class _Client:
    """The HTTP client: aiohttp when installed, else httpx."""

    def __init__(self, concurrency: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.limit = max(1, concurrency)
        try:
            import aiohttp
        except ImportError:  # pragma: no cover - aiohttp comes with the dev/bench extras
            aiohttp = None
        self.aiohttp = aiohttp
        self.session: Any = None

    async def __aenter__(self) -> _Client:
        if self.aiohttp is not None:
            connector = self.aiohttp.TCPConnector(limit=self.limit, force_close=False, enable_cleanup_closed=False)
            timeout = self.aiohttp.ClientTimeout(total=self.timeout_s)
            self.session = self.aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        else:
            import httpx

            limits = httpx.Limits(max_connections=self.limit, max_keepalive_connections=self.limit)
            self.session = httpx.AsyncClient(limits=limits, timeout=self.timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await (self.session.close() if self.aiohttp is not None else self.session.aclose())

    async def send(self, url: str, headers: dict[str, str], body: bytes, stream: bool) -> Result:
        start = time.perf_counter()
        result = Result(ok=False, status=0, start=start)
        try:
            if self.aiohttp is not None:
                async with self.session.post(url, data=body, headers=headers) as response:
                    result.status = response.status
                    if stream and response.status == 200:
                        await self._read_events(response.content, start, result)
                    else:
                        await self._read_whole(await response.read(), start, result)
            else:
                async with self.session.stream("POST", url, content=body, headers=headers) as response:
                    result.status = response.status_code
                    if stream and response.status_code == 200:
                        await self._read_events(_lines(response), start, result)
                    else:
                        await self._read_whole(await response.aread(), start, result)
        except Exception as exc:  # connection refused, reset, timeout: the request failed
            result.error = f"{type(exc).__name__}: {exc}"[:200]
        result.e2e = time.perf_counter() - start
        if result.ok is False and result.error is None and result.status != 200:
            result.error = f"HTTP {result.status}"
        return result

    @staticmethod
    async def _read_whole(payload: bytes, start: float, result: Result) -> None:
        result.ttft = time.perf_counter() - start
        if result.status != 200:
            return
        try:
            usage = json.loads(payload).get("usage") or {}
        except (ValueError, AttributeError):
            result.error = "the answer is not JSON"
            return
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.ok = True

    @staticmethod
    async def _read_events(lines: Any, start: float, result: Result) -> None:
        last = None
        events, usage_tokens, done = 0, None, False
        async for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            n, tokens = _count_event(data)
            if tokens is not None:
                usage_tokens = tokens
            if n:
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                events += n
        result.output_tokens = usage_tokens if usage_tokens is not None else events
        result.ok = done
        if not done:
            result.error = "the stream ended without [DONE]"


async def _lines(response: Any) -> Any:
    async for line in response.aiter_lines():
        yield line.encode()


# -- a level of load ---------------------------------------------------------------------------


@dataclass
class LevelSpec:
    mode: str  # "concurrency" | "rate"
    value: float
    requests: int
    duration_s: float


class Progress:
    """A one-line progress bar on stderr (nothing when off or not a terminal... unless forced)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0

    def update(self, label: str, done: int, total: int, started: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        width = 30
        filled = int(width * done / max(1, total))
        rate = done / max(1e-9, now - started)
        sys.stderr.write(f"\r{label:<12} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:8.1f} req/s")
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def run_level(
    client: _Client, url: str, headers: dict[str, str], bodies: list[bytes], spec: LevelSpec, stream: bool,
    progress: Progress, seed: int = 0,
) -> tuple[list[Result], float]:
    """Send one level's load; return every result and the level's wall time."""
    results: list[Result] = []
    started = time.perf_counter()
    deadline = started + spec.duration_s
    label = f"c={spec.value:g}" if spec.mode == "concurrency" else f"rate={spec.value:g}/s"
    issued = 0

    def next_body() -> bytes | None:
        nonlocal issued
        if issued >= spec.requests or time.perf_counter() >= deadline:
            return None
        body = bodies[issued % len(bodies)]
        issued += 1
        return body

    async def record(body: bytes) -> None:
        results.append(await client.send(url, headers, body, stream))
        progress.update(label, len(results), spec.requests, started)

    if spec.mode == "concurrency":

        async def worker() -> None:
            while (body := next_body()) is not None:
                await record(body)

        await asyncio.gather(*(worker() for _ in range(int(spec.value))))
    else:
        rng = random.Random(seed)
        tasks: set[asyncio.Task[None]] = set()
        next_at = started
        while (body := next_body()) is not None:
            next_at += rng.expovariate(spec.value)  # Poisson arrivals: open loop
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(record(body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    progress.update(label, len(results), spec.requests, started, force=True)
    progress.end()
    return results, wall


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None when there are no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _dist_ms(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"p{q}": _ms(percentile(values, q)) for q in PERCENTILES}
    out["mean"] = _ms(sum(values) / len(values)) if values else None
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarize(spec: LevelSpec, results: list[Result], wall: float) -> dict[str, Any]:
    """One level's figures."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or f"HTTP {r.status}"] = errors.get(r.error or f"HTTP {r.status}", 0) + 1
    tokens = sum(r.output_tokens for r in ok)
    return {
        "mode": spec.mode,
        "value": spec.value,
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "duration_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 2) if wall > 0 else 0.0,
        "output_tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "ttft_ms": _dist_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _dist_ms([x for r in ok for x in r.itl]),
        "e2e_ms": _dist_ms([r.e2e for r in ok]),
    }


def best_under(levels: list[dict[str, Any]], p99_ms: float) -> dict[str, Any] | None:
    """The level with the most requests/s whose e2e p99 stayed under `p99_ms` with no errors."""
    fine = [lv for lv in levels if not lv["errors"] and lv["e2e_ms"]["p99"] is not None and lv["e2e_ms"]["p99"] < p99_ms]
    return max(fine, key=lambda lv: lv["requests_per_s"]) if fine else None


# -- the whole run -----------------------------------------------------------------------------


@dataclass
class BenchConfig:
    url: str
    model: str
    endpoint: str = "chat"
    api_key: str | None = None
    stream: bool = False
    concurrency: list[int] = field(default_factory=lambda: [1])
    rates: list[float] = field(default_factory=list)
    requests: int = 200
    duration_s: float = 60.0
    warmup: int = 10
    max_tokens: int = 16
    ignore_eos: bool = False
    prompt_tokens: int = 32
    prompts_file: str | None = None
    timeout_s: float = 60.0
    seed: int = 0
    p99_budget_ms: float = 100.0
    progress: bool = True


def endpoint_url(base: str, endpoint: str) -> str:
    """`…/v1` + the endpoint's path (a full endpoint URL is used as given)."""
    base = base.rstrip("/")
    if base.endswith(("/chat/completions", "/completions")):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + ("/chat/completions" if endpoint == "chat" else "/completions")


async def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run every level of the sweep; return the JSON report."""
    prompts = load_prompts(Path(config.prompts_file)) if config.prompts_file else synthetic_prompts(
        min(config.requests, 1000), config.prompt_tokens, config.seed
    )
    bodies = [
        request_body(p, model=config.model, endpoint=config.endpoint, stream=config.stream, max_tokens=config.max_tokens,
                     ignore_eos=config.ignore_eos)
        for p in prompts
    ]
    url = endpoint_url(config.url, config.endpoint)
    headers = {"content-type": "application/json"}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    specs = [LevelSpec("concurrency", c, config.requests, config.duration_s) for c in config.concurrency] if not config.rates else [
        LevelSpec("rate", r, config.requests, config.duration_s) for r in config.rates
    ]
    progress = Progress(config.progress)
    levels = []
    width = max(int(s.value) if s.mode == "concurrency" else 64 for s in specs)
    async with _Client(width, config.timeout_s) as client:
        if config.warmup:
            warm = LevelSpec("concurrency", min(4, width), config.warmup, config.duration_s)
            await run_level(client, url, headers, bodies, warm, config.stream, Progress(False))
        for spec in specs:
            results, wall = await run_level(client, url, headers, bodies, spec, config.stream, progress, config.seed)
            levels.append(summarize(spec, results, wall))
    report = {"config": asdict(config), "levels": levels, "best_under_p99": None}
    report["config"].pop("api_key", None)  # never the secret
    best = best_under(levels, config.p99_budget_ms)
    if best is not None:
        report["best_under_p99"] = {"budget_ms": config.p99_budget_ms, "value": best["value"], "requests_per_s": best["requests_per_s"]}
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table."""
    rows = [
        f"{'level':>10} {'ok':>6} {'err':>5} {'req/s':>9} {'tok/s':>9} {'ttft p50':>9} {'ttft p99':>9} "
        f"{'itl p50':>8} {'itl p99':>8} {'e2e p50':>8} {'e2e p99':>8}  (ms)"
    ]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for lv in report["levels"]:
        level = f"c={lv['value']:g}" if lv["mode"] == "concurrency" else f"{lv['value']:g}/s"
        rows.append(
            f"{level:>10} {lv['ok']:>6} {sum(lv['errors'].values()):>5} {lv['requests_per_s']:>9.1f} {lv['output_tokens_per_s']:>9.1f} "
            f"{f(lv['ttft_ms']['p50']):>9} {f(lv['ttft_ms']['p99']):>9} {f(lv['itl_ms']['p50']):>8} {f(lv['itl_ms']['p99']):>8} "
            f"{f(lv['e2e_ms']['p50']):>8} {f(lv['e2e_ms']['p99']):>8}"
        )
    best = report.get("best_under_p99")
    if best:
        rows.append(f"best under p99 {best['budget_ms']:g} ms: {best['requests_per_s']:.1f} req/s (level {best['value']:g})")
    return "\n".join(rows)


def plot(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """A PNG of one or more sweeps: latency against achieved requests/s, and TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, report in reports.items():
        levels = report["levels"]
        rps = [lv["requests_per_s"] for lv in levels]
        line = left.plot(rps, [lv["e2e_ms"]["p50"] for lv in levels], marker="o", label=f"{name} e2e p50")[0]
        left.plot(rps, [lv["e2e_ms"]["p99"] for lv in levels], marker="x", linestyle="--", color=line.get_color(), label=f"{name} e2e p99")
        xs = [lv["value"] for lv in levels]
        right.plot(xs, [lv["ttft_ms"]["p50"] for lv in levels], marker="o", color=line.get_color(), label=f"{name} TTFT p50")
    left.set_xlabel("achieved requests/s")
    left.set_ylabel("latency (ms)")
    left.set_yscale("log")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=7)
    mode = next(iter(reports.values()))["levels"][0]["mode"] if reports else "concurrency"
    right.set_xlabel("concurrency" if mode == "concurrency" else "offered requests/s")
    right.set_ylabel("TTFT (ms)")
    right.set_yscale("log")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------


def _numbers(text: str, kind: type) -> list[Any]:
    values = [kind(x) for x in text.split(",") if x.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of positive numbers")
    return values


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of `turnout bench serve` (on `parser` when given)."""
    p = parser or argparse.ArgumentParser(prog="turnout bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server's OpenAI base URL, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", help="sent as `Authorization: Bearer ...` (default: $OPENAI_API_KEY if set)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--stream", action="store_true", help="stream answers (SSE): TTFT and inter-token latency")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=lambda t: _numbers(t, int), default=[1], help="closed-loop levels, e.g. 1,4,16")
    load.add_argument("--rate", type=lambda t: _numbers(t, float), help="open-loop levels in requests/s, e.g. 50,100,200")
    p.add_argument("--requests", type=int, default=200, help="requests per level (at most 1e6)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per level at most (at most 3600)")
    p.add_argument("--warmup", type=int, default=10, help="requests sent before the first level, not counted")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: answers run to max_tokens")
    p.add_argument("--prompt-tokens", type=int, default=32, help="synthetic prompts of about this many tokens")
    p.add_argument("--prompts", help="a JSONL prompt set instead (messages or prompt, max_tokens optional)")
    p.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    p.add_argument("--p99-budget-ms", type=float, default=100.0, help="for the `best under p99` line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a PNG of the sweep here")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    import os

    if not 1 <= args.requests <= MAX_REQUESTS_PER_LEVEL:
        raise SystemExit(f"turnout bench serve: --requests must be 1..{MAX_REQUESTS_PER_LEVEL}")
    if not 0 < args.duration <= MAX_DURATION_S:
        raise SystemExit(f"turnout bench serve: --duration must be in (0, {MAX_DURATION_S:g}]")
    return BenchConfig(
        url=args.url, model=args.model, endpoint=args.endpoint, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        stream=args.stream, concurrency=args.concurrency, rates=args.rate or [], requests=args.requests,
        duration_s=args.duration, warmup=args.warmup, max_tokens=args.max_tokens, prompt_tokens=args.prompt_tokens,
        ignore_eos=args.ignore_eos,
        prompts_file=args.prompts, timeout_s=args.timeout, seed=args.seed, p99_budget_ms=args.p99_budget_ms,
        progress=not args.no_progress,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Entry point with parsed arguments (the CLI's `bench serve`)."""
    config = config_from_args(args)
    report = asyncio.run(run_bench(config))
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot({config.url: report}, Path(args.plot))
    failed = all(lv["ok"] == 0 for lv in report["levels"])
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`turnout bench serve ARGS`."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
