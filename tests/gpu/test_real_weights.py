"""The engine's GPU path on real weights: SmolLM2-135M-Instruct's GGUF (TURNOUT_SMOLLM2_GGUF;
skipped without it, or without CUDA) against transformers' own model of the same file, for real
chat prompts rendered with the model's chat template (conftest.CHATS, N_TOKENS tokens each).

- fp32: the greedy tokens equal transformers' (Triton kernels, CUDA graphs, async scheduling),
  and the logits along them agree to float32 rounding.
- bf16: along transformers' fp32 greedy tokens (teacher-forced), the bf16 engine's logits are
  within BF16_MAX_REL_L2 of transformers' fp32 logits, with top-1 agreement reported and at
  least BF16_MIN_TOP1, and no further from them than transformers' own bf16 model is (with a
  little slack): the engine loses no accuracy of its own beyond bf16's.

The tolerances: on the CPU (this protocol with the CPU standing in for the GPU), the bf16
engine was 2.4 % (relative L2 over all 256 positions) from fp32 with 97.3 % top-1 agreement,
transformers' bf16 2.1 % / 98.0 %; per position the distance ranged up to 12 %, so no
per-position maximum is asserted: the 90th percentile (5.4 %) is.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from backends.generation import GenerationRequest, SamplingParams  # noqa: E402
from backends.paged.engine import LLMEngine  # noqa: E402
from tests.gpu.conftest import CHATS, N_TOKENS, load_hf_gguf  # noqa: E402
from tests.gpu.scoring import forced_logits, hf_forced_logits, logits_diff, release  # noqa: E402

FP32_MAX_REL_L2 = 1e-3
BF16_MAX_REL_L2, BF16_MAX_P90, BF16_MIN_TOP1 = 0.05, 0.10, 0.95
# The engine's bf16 distance from fp32 may exceed transformers' bf16 distance by this factor.
BF16_PEER_FACTOR = 1.5
# An fp32 greedy token may differ from transformers' only where transformers' top two logits
# are this close (float32 reductions in another order can swap such a near-tie).
NEAR_TIE = 1e-3

OPTS = dict(device="cuda", num_blocks=256, block_size=16, max_num_seqs=8, max_num_batched_tokens=256)


def test_fp32_greedy_tokens_equal_transformers(smollm2_gguf, smollm2_prompts, smollm2_hf_greedy, smollm2_hf_fp32, gpu_report) -> None:
    engine = LLMEngine.from_model(str(smollm2_gguf), dtype="float32", **OPTS)
    assert engine.kernels == "triton" and engine.graphs is not None and engine.async_scheduling
    reqs = [
        GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True))
        for i, p in enumerate(smollm2_prompts)
    ]
    out = engine.generate_sync(reqs)  # all prompts in one batch
    assert engine.counters.graph_steps > 0
    ours = [out[f"r{i}"] for i in range(len(smollm2_prompts))]
    ties = []
    for i, (p, got, expected) in enumerate(zip(smollm2_prompts, ours, smollm2_hf_greedy)):
        if got == expected:
            continue
        j = next(k for k, (a, b) in enumerate(zip(got, expected)) if a != b)
        with torch.inference_mode():
            logits = smollm2_hf_fp32(torch.tensor([p + expected[:j]], device="cuda")).logits[0, -1].float()
        gap = float(logits[expected[j]] - logits[got[j]])
        ties.append({"prompt": CHATS[i], "position": j, "gap": gap})
        assert gap <= NEAR_TIE, f"prompt {i} ({CHATS[i]!r}) differs at token {j} where transformers' margin is {gap:.4f}"
    # Along transformers' tokens, the logits agree to float32 rounding.
    diff = logits_diff(forced_logits(engine, smollm2_prompts, smollm2_hf_greedy), hf_forced_logits(smollm2_hf_fp32, smollm2_prompts, smollm2_hf_greedy))
    release(engine)
    gpu_report(fp32_vs_transformers=diff.as_dict(), near_ties=ties)
    assert diff.rel_l2 <= FP32_MAX_REL_L2 and diff.top1_agreement == 1.0, diff


def test_bf16_logits_close_to_transformers_fp32(smollm2_gguf, smollm2_prompts, smollm2_hf_greedy, smollm2_hf_fp32, gpu_report) -> None:
    engine = LLMEngine.from_model(str(smollm2_gguf), **OPTS)
    assert engine.dtype == torch.bfloat16
    got = forced_logits(engine, smollm2_prompts, smollm2_hf_greedy)
    assert engine.counters.graph_steps > 0
    release(engine)
    truth = hf_forced_logits(smollm2_hf_fp32, smollm2_prompts, smollm2_hf_greedy)
    hf_bf16 = load_hf_gguf(smollm2_gguf, torch.bfloat16)
    peer = hf_forced_logits(hf_bf16, smollm2_prompts, smollm2_hf_greedy)
    del hf_bf16
    diff, peer_diff = logits_diff(got, truth), logits_diff(peer, truth)
    gpu_report(engine_bf16_vs_fp32=diff.as_dict(), transformers_bf16_vs_fp32=peer_diff.as_dict())
    print(f"bf16 top-1 agreement with fp32: engine {diff.top1_agreement:.3f}, transformers {peer_diff.top1_agreement:.3f}")
    assert diff.rel_l2 <= BF16_MAX_REL_L2 and diff.rel_l2_p90 <= BF16_MAX_P90, diff
    assert diff.top1_agreement >= BF16_MIN_TOP1, diff
    assert diff.rel_l2 <= BF16_PEER_FACTOR * peer_diff.rel_l2 + 0.005, (diff, peer_diff)
