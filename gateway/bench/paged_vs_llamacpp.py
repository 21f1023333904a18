"""Aggregate decode throughput: the paged engine vs the llama.cpp runner, same model, same run.

Not a test: a program. For each concurrency C it fires C completion requests at once
(distinct prompts, greedy, ignore_eos, fixed max_tokens) through each backend's Backend
protocol and reports completion tokens per wall-clock second.

    .venv/bin/python -m gateway.bench.paged_vs_llamacpp --model smollm2-135m --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from gateway.bench.machine import cpu_name

TOPICS = [
    "the history of tea", "how rainbows form", "a day on a sailing ship", "why cats purr",
    "the water cycle", "how bridges stay up", "the first computers", "volcanoes",
    "bees and pollination", "the moon landing", "how bread rises", "ocean tides",
    "the printing press", "desert animals", "how vaccines work", "the northern lights",
]


async def measure(backend, concurrency: int, max_tokens: int) -> dict[str, float]:
    from backends.protocol import CompletionRequest

    def req(i: int) -> CompletionRequest:
        return CompletionRequest(
            model="bench", prompt=f"Write a short story about {TOPICS[i % len(TOPICS)]}.", max_tokens=max_tokens,
            temperature=0.0, ignore_eos=True,
        )

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(backend.completion(req(i)) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    tokens = sum(o.usage.completion_tokens for o in outs)
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": round(wall, 2), "tok_per_s": round(tokens / wall, 1)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for both engines")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--backends", default="paged,llamacpp")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    results: dict[str, list[dict[str, float]]] = {}
    print(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                      "loadavg_start": os.getloadavg()[0], "model": args.model, "max_tokens": args.max_tokens}))
    for kind in args.backends.split(","):
        if kind == "paged":
            from backends.paged.backend import PagedBackend

            backend = PagedBackend(name="paged", model=args.model, num_threads=args.threads, kv_cache_gib=0.5, dtype="float32")
        else:
            from backends.llamacpp.runner import LlamaCppBackend

            backend = LlamaCppBackend(name="llamacpp", model=args.model, n_threads=args.threads, max_queue=max(levels) + 1)
        await backend.start()
        try:
            await measure(backend, 1, 8)  # warm-up
            results[kind] = []
            for c in levels:
                r = await measure(backend, c, args.max_tokens)
                results[kind].append(r)
                print(json.dumps({"backend": kind, **r}), flush=True)
        finally:
            await backend.close()
    print(json.dumps({"loadavg_end": os.getloadavg()[0]}))
    print("\n| concurrency | " + " | ".join(f"{k} tok/s" for k in results) + " |")
    print("|---|" + "---|" * len(results))
    for i, c in enumerate(levels):
        print(f"| {c} | " + " | ".join(str(results[k][i]["tok_per_s"]) for k in results) + " |")


if __name__ == "__main__":
    asyncio.run(main())
