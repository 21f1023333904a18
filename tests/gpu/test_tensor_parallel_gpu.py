"""Tensor parallelism on two GPUs (NCCL; decode steps in CUDA graphs that capture the
collectives; async scheduling, so the sampled ids cross to rank 1 on the device) against the
one-GPU engine on the same random weights. Skipped without two CUDA GPUs.

Rank 1 draws its random weights on its own GPU from the same seed as rank 0: on GPUs of one
model (the lent machines) those are the values rank 0 draws, so both engines hold one model.
"""

from __future__ import annotations

import gc
import random
from typing import Any

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

from backends.generation import GenerationRequest, SamplingParams  # noqa: E402
from backends.paged.engine import LLMEngine  # noqa: E402

pytestmark = pytest.mark.timeout(900)


def prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def greedy(i: int, prompt: list[int], n: int) -> GenerationRequest:
    return GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


def run(engine: LLMEngine, ps: list[list[int]], n: int) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    """Greedy tokens, and every step's logits (copied to the host: a graph's output buffer is
    overwritten by the next replay)."""
    seen: list[torch.Tensor] = []
    forward = engine.runner.forward

    def recording(inp: Any, pooled: Any = None) -> torch.Tensor:
        logits = forward(inp, pooled)
        seen.append(logits.float().cpu())
        return logits

    engine.runner.forward = recording  # type: ignore[method-assign]
    return engine.generate_sync([greedy(i, p, n) for i, p in enumerate(ps)]), seen


def release(engine: LLMEngine) -> None:
    engine.close()
    engine.cache.k.clear()
    engine.cache.v.clear()
    engine.graphs = None
    engine.model = None
    gc.collect()
    torch.cuda.empty_cache()


def test_two_gpus_give_the_tokens_and_logits_of_one_in_fp32(gpu_report) -> None:
    # 48 blocks of 16 tokens cannot hold six sequences of up to 300 tokens: preemption; a
    # budget of 128 tokens chunks the prompts; decodes replay graphs with all-reduces inside.
    opts: dict[str, Any] = dict(
        device="cuda", dtype="float32", num_blocks=48, block_size=16, max_num_batched_tokens=128,
        max_num_seqs=8, max_model_len=512, watermark=0.0,
    )  # fmt: skip
    one = LLMEngine.from_model("dummy:llama3-1b", **opts)
    ps = prompts(6, one.config.vocab_size, 40, 280, seed=0)
    n = 16
    ref, ref_logits = run(one, ps, n)
    assert one.counters.graph_steps > 0 and one.scheduler.num_preemptions > 0
    release(one)

    two = LLMEngine.from_model("dummy:llama3-1b", tensor_parallel_size=2, **opts)
    try:
        assert two.graphs is not None and two.async_scheduling and two.runner.local_config.num_kv_heads == 4
        got, tp_logits = run(two, ps, n)
        graph_steps, preemptions = two.counters.graph_steps, two.scheduler.num_preemptions
    finally:
        release(two)
    assert ranks_gone(two)
    assert graph_steps > 0 and preemptions > 0
    assert len(tp_logits) == len(ref_logits)
    errs = [float((a - b).norm() / b.norm()) for a, b in zip(tp_logits, ref_logits) if b.numel()]
    gpu_report(worst_step_relative_l2=max(errs), graph_steps=graph_steps, preemptions=preemptions)
    # The same sums in another order (each rank's partial products, then the all-reduce).
    assert max(errs) < 1e-4, errs
    assert got == ref


def test_two_gpus_give_the_prompt_logits_of_one_in_bf16(gpu_report) -> None:
    """bf16 rounds each rank's partial sums before the all-reduce, so the logits move a little;
    compared on prompts alone (one token each), where both engines see the same inputs."""
    opts: dict[str, Any] = dict(device="cuda", max_num_batched_tokens=512, max_num_seqs=16, max_model_len=1024, gpu_memory_utilization=0.5)
    one = LLMEngine.from_model("dummy:llama3-1b", **opts)
    ps = prompts(12, one.config.vocab_size, 20, 300, seed=1)
    _, ref_logits = run(one, ps, 1)
    release(one)
    two = LLMEngine.from_model("dummy:llama3-1b", tensor_parallel_size=2, **opts)
    try:
        _, tp_logits = run(two, ps, 1)
    finally:
        release(two)
    ref, got = torch.cat([t for t in ref_logits if t.numel()]), torch.cat([t for t in tp_logits if t.numel()])
    assert ref.shape == got.shape == (len(ps), two.config.vocab_size)
    errs = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    gpu_report(relative_l2=errs, top1_agreement=agree)
    assert max(errs) < 3e-2, errs
    assert agree >= 0.9


def test_two_gpus_get_a_larger_kv_pool(gpu_report) -> None:
    """Each rank holds half the weights and half the KV heads, so the profiled pools (the
    smaller of the two ranks') hold more than twice the tokens."""
    opts: dict[str, Any] = dict(device="cuda", gpu_memory_utilization=0.5, max_num_seqs=32, max_num_batched_tokens=1024, max_model_len=4096)
    one = LLMEngine.from_model("dummy:llama3-8b", **opts)
    blocks_one = one.runner.num_blocks
    out_one = one.generate_sync([greedy(0, list(range(3, 40)), 8)])
    release(one)
    two = LLMEngine.from_model("dummy:llama3-8b", tensor_parallel_size=2, **opts)
    try:
        blocks_two = two.runner.num_blocks
        out_two = two.generate_sync([greedy(0, list(range(3, 40)), 8)])
    finally:
        release(two)
    gpu_report(kv_blocks_tp1=blocks_one, kv_blocks_tp2=blocks_two)
    assert blocks_two > 2 * blocks_one
    assert len(out_two["r0"]) == len(out_one["r0"]) == 8


def ranks_gone(engine: LLMEngine) -> bool:
    return engine.ranks is not None and all(p.poll() is not None for p in engine.ranks.procs)
