"""Benchmark (a program, not a test): what API keys and rate limits cost.

1. One limiter decision (key RPM+TPM and tenant RPM+TPM: four buckets): the pure function,
   the in-process store, and the Redis store (one EVALSHA to a local redis-server).
2. One chat request through the whole gateway app (in-process ASGI, a stub backend that
   answers at once) with auth+limits off, on in-process (file keys), on over Redis (Redis
   keys; the revocation check rides in the same round trip).

    .venv/bin/python -m gateway.bench.limits [--n 3000]

Starts its own redis-server on a free loopback port (needs `redis-server` on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

import gateway.registry
from backends.protocol import ChatChoice, ChatCompletion, LoadReport, ModelCard, ResponseMessage, Usage
from gateway.app import create_app
from gateway.bench.harness import RedisServer, free_port
from gateway.keys import FileKeyStore, RedisKeyStore, new_key
from gateway.ratelimit import InProcessStore, RedisStore, buckets_for, redis_client
from policies.ratelimit import decide
from policies.schema import LimitSpec, parse_config

BIG = LimitSpec(rpm=10**9, tpm=10**12)  # never denies: we time the decision, not 429s


class StubBackend:
    """Answers at once: what remains is the gateway's own cost."""

    def __init__(self, name: str, model_id: str) -> None:
        self.name, self.model_id = name, model_id

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id)]

    def load(self) -> LoadReport:
        return LoadReport()

    async def chat(self, request):  # type: ignore[no-untyped-def]
        return ChatCompletion(
            model=request.model,
            choices=[ChatChoice(message=ResponseMessage(content="ok"), finish_reason="stop")],
            usage=Usage(prompt_tokens=10, completion_tokens=1, total_tokens=11),
        )


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def report(label: str, samples_s: list[float]) -> None:
    us = [x * 1e6 for x in samples_s]
    print(f"  {label:<44} p50 {pct(us, .5):8.1f} us   p99 {pct(us, .99):8.1f} us   mean {statistics.fmean(us):8.1f} us")


async def bench_decisions(n: int, redis_url: str) -> None:
    print(f"limiter decision, 4 buckets (key rpm+tpm, tenant rpm+tpm), n={n}:")
    buckets = buckets_for("bench:", "k", "t", BIG, BIG, 60)
    rates = [b.rate for b in buckets]
    costs = [1, 100, 1, 100]
    tats: list[float | None] = [None] * 4
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        d = decide(tats, rates, costs, time.time())
        samples.append(time.perf_counter() - t)
        tats = list(d.tats)
    report("policies.ratelimit.decide (pure)", samples)
    for label, store in (("in-process store", InProcessStore()), ("Redis store (EVALSHA, loopback)", RedisStore(redis_client(redis_url, 50)))):
        for _ in range(200):
            await store.take(buckets, costs, None)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            await store.take(buckets, costs, None)
            samples.append(time.perf_counter() - t)
        report(label, samples)
        if isinstance(store, RedisStore):
            workers, each = 32, max(1, n // 32)

            async def worker() -> None:
                for _ in range(each):
                    await store.take(buckets, costs, None)

            t = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(workers)))
            rate = workers * each / (time.perf_counter() - t)
            print(f"  {'Redis store, 32 callers at once':<44} {rate:8.0f} decisions/s (one gateway process)")
        await store.close()


async def bench_requests(n: int, redis_url: str, tmp: Path) -> None:
    gateway.registry.build_backend = lambda cfg, residency=None: StubBackend(cfg.name, cfg.model_id())  # type: ignore[assignment]
    backends = "backends: [{name: stub, kind: llamacpp, model: stub-model}]\n"
    limits = "limits: {key: {rpm: 1000000000, tpm: 1000000000000}, tenant: {rpm: 1000000000, tpm: 1000000000000}}\n"
    file_secret, record = new_key("bench")
    FileKeyStore(tmp / "keys.json").add(record)
    redis_secret, record = new_key("bench")
    RedisKeyStore(redis_url, "bench:").add(record)
    modes = [
        ("auth+limits off (auth: none)", backends, None),
        ("auth+limits on, in-process (file keys)", f"auth: {{store: file, path: {tmp}/keys.json}}\n{limits}{backends}", file_secret),
        (
            "auth+limits on, Redis (keys + limits)",
            f"auth: {{store: redis}}\nredis: {{url: '{redis_url}', prefix: 'bench:'}}\n{limits}{backends}",
            redis_secret,
        ),
    ]
    body = {"model": "stub-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 16}
    print(f"one chat request through the app (in-process ASGI, stub backend), n={n}:")
    results = {}
    for label, text, secret in modes:
        app = create_app(parse_config(text))
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            for _ in range(300):
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                assert r.status_code == 200, r.text
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                await client.post("/v1/chat/completions", json=body, headers=headers)
                samples.append(time.perf_counter() - t)
        await app.state.runtime.snapshot.limiter.close()  # no lifespan under ASGITransport: close it here
        report(label, samples)
        results[label] = pct(samples, 0.5)
    base = results[modes[0][0]]
    for label, _, _ in modes[1:]:
        print(f"  added p50, {label:<36} {(results[label] - base) * 1e6:+8.1f} us")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(port=free_port(), log=Path(tmp) / "redis.log")
        redis.start()
        try:
            await bench_decisions(args.n, redis.url)
            await bench_requests(args.n, redis.url, Path(tmp))
        finally:
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
