"""The engine on the GPU path (Triton attention, fused kernels, CUDA graphs, profiled KV pool)
against transformers on the same random weights. Skipped without CUDA.

- fp32: greedy tokens equal transformers' generate(), with chunked prefill, mixed steps,
  padded CUDA-graph batches and preemption all exercised.
- bf16: the logits the engine sampled from (prefill and graph-replayed decode steps) are close
  to transformers' teacher-forced logits over the same tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import backends.paged.model_runner as runner_module  # noqa: E402
from backends.generation import GenerationRequest, SamplingParams  # noqa: E402
from backends.paged.engine import LLMEngine  # noqa: E402
from backends.paged.hf_compat import build_hf_model  # noqa: E402


def prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def greedy(i: int, prompt: list[int], n: int) -> GenerationRequest:
    return GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_fp32_greedy_tokens_equal_transformers(async_scheduling: bool) -> None:
    # 24 blocks of 16 tokens cannot hold all five sequences at once: preemption by recompute.
    engine = LLMEngine.from_model(
        "dummy:smollm2-135m", device="cuda", dtype="float32", num_blocks=24, block_size=16,
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=384, watermark=0.0,
        async_scheduling=async_scheduling,
    )  # fmt: skip
    assert engine.kernels == "triton" and engine.graphs is not None
    assert engine.async_scheduling is async_scheduling
    ps = prompts(5, engine.config.vocab_size, 10, 150, seed=0)
    n = 16
    out = engine.generate_sync([greedy(i, p, n) for i, p in enumerate(ps)])
    assert engine.counters.graph_steps > 0, "decode steps should replay CUDA graphs"
    assert engine.scheduler.num_preemptions > 0, "the pool was sized to force preemption"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    hf = build_hf_model(engine.config, engine.model.w)
    for i, p in enumerate(ps):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False)
        assert out[f"r{i}"] == ref[0, len(p) :].tolist(), f"request {i} differs"


def test_bf16_logits_close_to_transformers_and_pool_sized_by_profiling(monkeypatch: pytest.MonkeyPatch) -> None:
    free0, total = torch.cuda.mem_get_info()
    util = (total - free0) / total + 0.25  # a quarter of the device on top of what is in use
    engine = LLMEngine.from_model(
        "dummy:llama3-1b", device="cuda", gpu_memory_utilization=util, block_size=16,
        max_num_seqs=16, max_num_batched_tokens=512, max_model_len=2048,
    )  # fmt: skip
    assert engine.dtype == torch.bfloat16
    assert engine.async_scheduling  # the default on CUDA
    cache_bytes = engine.cache.nbytes()
    assert torch.cuda.memory_allocated() <= util * total, "the engine went over gpu_memory_utilization"
    assert cache_bytes >= 0.5 * (0.25 * total - engine.model.w.nbytes()), "the KV pool should get most of the rest"

    recorded: list[tuple[list[str], torch.Tensor]] = []
    real_sample_batch = runner_module.sample_batch

    def recording_sample_batch(logits: torch.Tensor, states: list, allowed: torch.Tensor | None = None) -> list:
        results = real_sample_batch(logits, states, allowed)
        recorded.append(([s.request_id for s in states], logits.float().cpu()))
        return results

    real_sample_tokens_device = runner_module.sample_tokens_device

    def recording_sample_tokens_device(logits: torch.Tensor, states: list, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        tokens = real_sample_tokens_device(logits, states, allowed)
        if tokens is not None:  # otherwise the runner calls sample_batch at collect
            recorded.append(([s.request_id for s in states], logits.float().cpu()))
        return tokens

    monkeypatch.setattr(runner_module, "sample_batch", recording_sample_batch)
    monkeypatch.setattr(runner_module, "sample_tokens_device", recording_sample_tokens_device)
    # Request ids travel on the sampler states for this test only.
    real_add = engine.add_request

    def add(req: GenerationRequest) -> None:
        real_add(req)
        engine.requests[req.request_id].seqs[0].sampler.request_id = req.request_id

    engine.add_request = add  # type: ignore[method-assign]
    ps = prompts(6, engine.config.vocab_size, 20, 300, seed=1)
    n = 8
    out = engine.generate_sync([greedy(i, p, n) for i, p in enumerate(ps)])
    assert engine.counters.graph_steps > 0

    ours: dict[str, list[torch.Tensor]] = {f"r{i}": [] for i in range(len(ps))}
    for ids, logits in recorded:
        for rid, row in zip(ids, logits):
            ours[rid].append(row)
    hf = build_hf_model(engine.config, engine.model.w)
    errs, agree, total_rows = [], 0, 0
    for i, p in enumerate(ps):
        rid = f"r{i}"
        assert len(ours[rid]) == n
        full = torch.tensor([p + out[rid]], device="cuda")
        with torch.inference_mode():
            ref = hf(full).logits[0, len(p) - 1 : len(p) - 1 + n].float().cpu()
        got = torch.stack(ours[rid])
        errs.append(((got - ref).norm() / ref.norm()).item())
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total_rows += n
    print("bf16 relative logit errors", [f"{e:.2e}" for e in errs], "top-1 agreement", agree / total_rows)
    assert max(errs) < 5e-2, errs
    assert agree / total_rows >= 0.75


# Every field bounded, so that even a random model finishes the object within max_tokens.
BOUNDED = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 999}, "s": {"type": "string", "maxLength": 8}},
    "required": ["ok", "n", "s"],
    "additionalProperties": False,
}


def test_constrained_rows_and_n_choices_on_the_gpu_path() -> None:
    """Grammar masks through the pinned buffer and unpacked on the device, with CUDA graphs and
    async scheduling: the unconstrained rows' tokens are those of a run without the constrained
    requests; constrained choices (n = 2, sharing their prompt's blocks) are valid JSON and, greedy,
    equal each other."""
    import json

    import jsonschema

    from backends.grammar import json_schema_grammar

    engine = LLMEngine.from_model(
        "dummy:smollm2-135m", device="cuda", dtype="float32", num_blocks=256, block_size=16,
        max_num_seqs=16, max_num_batched_tokens=256, max_model_len=512,
    )  # fmt: skip
    assert engine.async_scheduling and engine.graphs is not None
    vocab = engine.config.vocab_size
    ps = prompts(6, vocab, 10, 60, seed=2)
    plain = [greedy(i, p, 40) for i, p in enumerate(ps[:4])]
    alone = engine.generate_sync(plain)
    grammar = json_schema_grammar(BOUNDED)
    compiled = engine.tokenizer.grammar_compiler(vocab).compile(grammar, what="test", param="x")
    cons = [
        GenerationRequest(f"c{i}", p, SamplingParams(max_tokens=120, temperature=0.0, n=2, grammar=grammar), constraint=compiled.copy())
        for i, p in enumerate(ps[4:])
    ]
    graph0 = engine.counters.graph_steps
    mixed = engine.generate_choices([*plain[:2], *cons, *plain[2:]])
    assert engine.counters.graph_steps > graph0
    assert {r.request_id: mixed[r.request_id][0] for r in plain} == alone
    for r in cons:
        first, second = mixed[r.request_id]
        assert first == second and first[-1] == 2  # greedy choices agree; ended on EOS
        jsonschema.validate(json.loads(engine.tokenizer.decode(first)), BOUNDED)
    assert engine.scheduler.num_grammar_rejections == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_constrained_steps_stay_in_flight_and_equal_sync_on_the_gpu_path() -> None:
    """Async scheduling with grammar rows: each step's forward pass is launched before the last
    step is collected and its masks filled after, and the step stays in flight; the tokens equal
    those of synchronous scheduling (fp32, greedy, CUDA graphs)."""
    import json

    import jsonschema

    from backends.grammar import json_schema_grammar

    grammar = json_schema_grammar(BOUNDED)
    results, in_flight = {}, {}
    for asy in (False, True):
        engine = LLMEngine.from_model(
            "dummy:smollm2-135m", device="cuda", dtype="float32", num_blocks=256, block_size=16,
            max_num_seqs=16, max_num_batched_tokens=256, max_model_len=512, async_scheduling=asy,
        )  # fmt: skip
        vocab = engine.config.vocab_size
        compiled = engine.tokenizer.grammar_compiler(vocab).compile(grammar, what="test", param="x")
        ps = prompts(8, vocab, 10, 60, seed=3)
        reqs = [
            GenerationRequest(f"c{i}", p, SamplingParams(max_tokens=120, temperature=0.0, grammar=grammar), constraint=compiled.copy())
            for i, p in enumerate(ps[:6])
        ]
        reqs += [greedy(6 + i, p, 50) for i, p in enumerate(ps[6:])]
        for r in reqs:
            engine.add_request(r)
        out: dict[str, list[int]] = {}
        in_flight[asy] = 0
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.delta.token_ids)
            in_flight[asy] += engine._inflight is not None and engine._inflight.constrained
        assert engine.counters.graph_steps > 0 and engine.scheduler.num_grammar_rejections == 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        for i in range(6):
            assert out[f"c{i}"][-1] == 2
            jsonschema.validate(json.loads(engine.tokenizer.decode(out[f"c{i}"])), BOUNDED)
        results[asy] = out
    assert in_flight[False] == 0 and in_flight[True] > 10
    assert results[True] == results[False]
