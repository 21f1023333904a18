"""Embedding throughput: the paged engine vs the llama.cpp runner, same model, same run.

Not a test: a program. Each request carries `--batch` inputs of `--tokens` tokens (token ids
cut from varied text with each engine's own tokenizer, distinct per input); requests run one
after another through each backend's `embeddings()` (in process: the engines, not the pipe),
after one warm-up request. Reports inputs per wall-clock second.

    .venv/bin/python -m gateway.bench.embeddings --model smollm2-135m --threads 2
    turnout bench embeddings --engines paged --model dummy:llama3-8b --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from typing import Any

from gateway.bench.machine import cpu_name

WORDS = (
    "the quick brown fox jumps over a lazy dog while rain falls on quiet hills and rivers run "
    "toward the sea past old towns where bakers sell bread and children learn about stars planets "
    "bridges volcanoes tides music numbers history poems machines gardens markets and ships"
).split()


def inputs_for(backend: Any, batch: int, tokens: int, offset: int) -> list[list[int]]:
    """`batch` distinct inputs of exactly `tokens` token ids, from the backend's tokenizer."""
    out = []
    for i in range(batch):
        k = offset + i
        words = [WORDS[(k * 7 + j * (k % 5 + 1)) % len(WORDS)] for j in range(tokens * 2)]
        ids = backend.tokenize(f"Item {k}: " + " ".join(words))
        while len(ids) < tokens:
            ids = ids + ids
        out.append(ids[:tokens])
    return out


async def measure(backend: Any, batch: int, tokens: int, requests: int) -> dict[str, float]:
    """Inputs/s over `requests` sequential requests of `batch` inputs (after one warm-up)."""
    from backends.protocol import EmbeddingRequest

    def request(r: int) -> EmbeddingRequest:
        return EmbeddingRequest(model="bench", input=inputs_for(backend, batch, tokens, r * batch))

    await backend.embeddings(request(requests))  # warm-up: kernels, the lazy embedding instance
    prepared = [request(r) for r in range(requests)]
    t0 = time.perf_counter()
    for req in prepared:
        res = await backend.embeddings(req)
        assert len(res.data) == batch
    wall = time.perf_counter() - t0
    return {"inputs_per_s": round(batch * requests / wall, 1), "tokens_per_s": round(batch * requests * tokens / wall), "wall_s": round(wall, 2)}


def build(engine: str, args: argparse.Namespace) -> Any:
    """An in-process backend for `engine` (paged or llamacpp) with the run's options."""
    if engine == "paged":
        from backends.paged.backend import PagedBackend

        options: dict[str, Any] = {"device": args.device, "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.n_ctx}
        if args.device == "cpu":
            options["num_threads"] = args.threads
        if args.dtype:
            options["dtype"] = args.dtype
        return PagedBackend("paged", args.model, task="embed", **options)
    from backends.llamacpp.runner import LlamaCppBackend

    return LlamaCppBackend("llamacpp", args.model, task="embed", n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for engine in args.engines.split(","):
        backend = build(engine, args)
        await backend.start()
        try:
            results[engine] = await measure(backend, args.batch, args.tokens, args.requests)
        finally:
            await backend.close()
        print(f"{engine}: {results[engine]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of `turnout bench embeddings`."""
    p = argparse.ArgumentParser(prog="turnout bench embeddings", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="store name, GGUF path, or dummy:<shape> (paged only)")
    p.add_argument("--engines", default="paged,llamacpp", help="comma-separated: paged, llamacpp")
    p.add_argument("--batch", type=int, default=64, help="inputs per request")
    p.add_argument("--tokens", type=int, default=100, help="tokens per input")
    p.add_argument("--requests", type=int, default=5, help="timed requests per engine")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (both engines)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context window (llama.cpp's embedding batch is this size)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="paged: the step's token budget")
    p.add_argument("--device", default="cpu", help="paged: cpu or cuda")
    p.add_argument("--dtype", default=None, help="paged: float32, bfloat16, ... (default: the engine's)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp: layers offloaded (where it was built with a GPU)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    args = p.parse_args(argv)
    results = asyncio.run(run(args))
    record = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "device": args.device},
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "results": results,
    }
    if args.device != "cpu":
        import torch

        record["machine"]["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(record, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
