"""`quantization: fp8` on the GPU (skipped without CUDA, or on a GPU without FP8 tensor cores).

- The pieces: the fused Triton quantizer against fp8.quantize_rows; cuBLAS's row-wise FP8
  GEMM against the product of the dequantized operands; the FP8 linear layer captured in a
  CUDA graph and replayed on new inputs.
- The engine: logits of the FP8 engine (Triton kernels, CUDA graphs, async scheduling) against
  the bf16 engine's at the same positions (teacher-forced, prefill and decode), on a mid-sized
  random model (hidden 2048, 8 layers, Llama 3's 4:1 GQA), on the llama3-8b shape (where the
  weight bytes and the profiled KV pool are checked too), and on the real SmolLM2 GGUF
  (TURNOUT_SMOLLM2_GGUF).

How close FP8 can be. e4m3 keeps 3 mantissa bits: each operand of each GEMM carries ~2.5 %
RMS rounding error, ~3.7 % for a GEMM's output on random data, and these models amplify a
perturbation through their layers. On the CPU (torch's `_scaled_mm`: the same math, this
file's protocol run with the CPU standing in for the GPU) FP8 gave logits 10.3 % (relative
L2) from bf16's with 77 % top-1 agreement on the mid random model, 15.7 % / 52 % on the
llama3-8b shape, and 12.4 % / 91 % on SmolLM2 over conftest.CHATS; merely rounding the activations to bf16 rather than keeping them
in fp32 moved an FP8 model's logits by 9 % already. So the issue's 3 % / 97 % is out of reach
for per-channel x per-token e4m3 on these models (bf16 itself is 1.4-2.4 % from fp32), and the
bounds below are those CPU figures with margin. What tells a right FP8 path from a wrong one:
the GPU path must be about as close to bf16 as the plain-torch FP8 path on the same GPU; a
wrong scale or layout gives logits ~100 % off with ~0 % agreement; and every figure is
recorded (TURNOUT_GPU_REPORT).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a GPU with FP8 tensor cores (compute capability 8.9+)", allow_module_level=True)

from backends.generation import GenerationRequest, SamplingParams  # noqa: E402
from backends.paged import fp8  # noqa: E402
from backends.paged.config import dummy_config  # noqa: E402
from backends.paged.engine import LLMEngine  # noqa: E402
from backends.paged.tokenizer import ByteTokenizer  # noqa: E402
from backends.paged.triton_ops import quantize_rows as triton_quantize_rows  # noqa: E402
from tests.gpu.scoring import forced_logits, hf_forced_logits, logits_diff, release  # noqa: E402

DEV = "cuda"

# FP8 against bf16 (see the module docstring for where these come from).
RANDOM_MAX_REL_L2, RANDOM_MIN_TOP1 = 0.16, 0.65
# 32 layers amplify more, and a random model's top logits over a 128k vocabulary are near-ties:
# on the CPU the llama3-8b shape gave 15.7 % / 52 % (48 positions), 13.3 % / 77 % with 16 layers.
LLAMA3_8B_MAX_REL_L2, LLAMA3_8B_MIN_TOP1 = 0.25, 0.30
SMOLLM2_MAX_REL_L2, SMOLLM2_MIN_TOP1 = 0.20, 0.75
# The Triton + CUDA-graph FP8 path against the plain-torch FP8 path, each against bf16.
PATH_REL_L2_FACTOR, PATH_TOP1_SLACK = 1.5, 0.10

# Llama 3's proportions at a quarter of 8B's width: hidden 2048, 16 heads of 128 over 4 KV
# heads (4:1 GQA), SwiGLU 3.5x, 8 layers; a 32k vocabulary keeps the logits' copies small.
MID = dataclasses.replace(
    dummy_config("llama3-8b"), hidden_size=2048, intermediate_size=7168, num_layers=8, num_heads=16, num_kv_heads=4,
    head_dim=128, vocab_size=32768, max_position_embeddings=4096,
)  # fmt: skip


def bf16_inputs(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEV, dtype=torch.float32)
    x[:, 3] *= 50.0  # an outlier channel, as real activations have
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 2048), (7, 576), (256, 4096), (33, 14336), (5, 100)])
def test_triton_quantizer_matches_torch(shape: tuple[int, int]) -> None:
    x = bf16_inputs(shape, seed=shape[0])
    x[0] = 0.0  # an all-zero row
    q, s = triton_quantize_rows(x)
    q_ref, s_ref = fp8.quantize_rows(x)
    assert q.dtype == fp8.FP8_DTYPE and s.shape == (shape[0], 1) and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    # Triton's division may round differently in the last bit of float32, which moves a value
    # that sits on an e4m3 rounding boundary by one step: allow that, rarely.
    a, b = q.float() * s, q_ref.float() * s_ref
    differ = (a != b).float().mean().item()
    assert differ <= 1e-3, differ
    # One e4m3 step at most: 2^-3 of a normal value, 2^-9 (in scaled units) for a subnormal.
    assert ((a - b).abs() <= 2.0**-3 * b.abs() + 2.0**-9 * s_ref).all()


@pytest.mark.parametrize("with_bias", [False, True])  # a bias (Qwen2's qkv) goes into the GEMM's epilogue
@pytest.mark.parametrize("quantizer", ["torch", "triton"])
@pytest.mark.parametrize(("tokens", "k", "n"), [(1, 4096, 6144), (16, 576, 960), (300, 2048, 7168 * 2)])
def test_fp8_gemm_equals_the_dequantized_product(quantizer: str, tokens: int, k: int, n: int, with_bias: bool) -> None:
    quantize = triton_quantize_rows if quantizer == "triton" else fp8.quantize_rows
    g = torch.Generator(device=DEV).manual_seed(tokens)
    x = bf16_inputs((tokens, k), seed=k)
    w = (torch.randn((n, k), generator=g, device=DEV) * k**-0.5).to(torch.bfloat16)
    bias = (torch.randn(n, generator=g, device=DEV) * 0.1).to(torch.bfloat16) if with_bias else None
    wq = fp8.quantize_weight(w)
    out = fp8.linear(x, wq, bias, quantize)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, n)
    xq, xs = quantize(x)
    b = bias.float() if bias is not None else 0.0
    ref = (xq.float() * xs) @ wq.dequantize().t() + b
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2  # the output's one bf16 rounding
    exact = x.float() @ w.float().t() + b
    assert ((out.float() - exact).norm() / exact.norm()).item() < 0.06  # FP8's own error


def test_fp8_linear_replays_in_a_cuda_graph() -> None:
    """No host sync and no allocation that depends on values: the quantizer and the GEMM are
    captured once and replayed on new inputs, giving what an eager call gives."""
    k, n = 2048, 3072
    w = fp8.quantize_weight((torch.randn((n, k), device=DEV) * k**-0.5).to(torch.bfloat16))
    static = bf16_inputs((8, k), seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8.linear(static, w, None, triton_quantize_rows)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8.linear(static, w, None, triton_quantize_rows)
    for seed in (2, 3):
        new = bf16_inputs((8, k), seed=seed)
        static.copy_(new)
        graph.replay()
        torch.testing.assert_close(out, fp8.linear(new, w, None, triton_quantize_rows), rtol=1e-2, atol=1e-2)


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def greedy_scripts(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    out = engine.generate_sync(
        [GenerationRequest(f"g{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for i, p in enumerate(prompts)]
    )
    return [out[f"g{i}"] for i in range(len(prompts))]


def mid_engine(**options) -> LLMEngine:
    return LLMEngine.from_model(
        "dummy:llama3-8b", config=MID, tokenizer=ByteTokenizer(MID.vocab_size), device=DEV, num_blocks=512, block_size=16,
        max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024, seed=0, **options,
    )  # fmt: skip


def test_fp8_engine_against_bf16_on_a_mid_sized_random_model(gpu_report) -> None:
    """8 prompts x 32 positions (the last prompt position and 31 decodes), in one batch."""
    bf16 = mid_engine()
    prompts = random_prompts(8, MID.vocab_size, 20, 200, seed=0)
    scripts = greedy_scripts(bf16, prompts, 32)
    ref = forced_logits(bf16, prompts, scripts)
    bf16_bytes = bf16.model.w.nbytes()
    release(bf16)

    engine = mid_engine(quantization="fp8")
    assert engine.kernels == "triton" and engine.graphs is not None and engine.async_scheduling
    got = forced_logits(engine, prompts, scripts)
    assert engine.counters.graph_steps > 0, "decode steps should replay CUDA graphs"
    fp8_bytes = engine.model.w.nbytes()
    release(engine)

    # The plain-torch FP8 path on the same GPU (torch quantizer and attention, no graphs).
    reference = mid_engine(quantization="fp8", kernels="torch", enforce_eager=True)
    torch_path = forced_logits(reference, prompts, scripts)
    release(reference)

    diff, torch_diff = logits_diff(got, ref), logits_diff(torch_path, ref)
    linear = sum(MID.hidden_size * n for n in (3072, 2048, 2 * MID.intermediate_size)) + MID.intermediate_size * MID.hidden_size
    gpu_report(fp8_vs_bf16=diff.as_dict(), torch_path_fp8_vs_bf16=torch_diff.as_dict(), weight_bytes={"bf16": bf16_bytes, "fp8": fp8_bytes})
    # One byte per linear weight instead of two, plus a float32 scale per output channel.
    per_layer_scales = 3072 + 2048 + 2 * MID.intermediate_size + MID.hidden_size
    assert fp8_bytes == bf16_bytes - MID.num_layers * (linear - 4 * per_layer_scales)
    assert diff.rel_l2 <= RANDOM_MAX_REL_L2 and diff.top1_agreement >= RANDOM_MIN_TOP1, diff
    assert diff.rel_l2 <= PATH_REL_L2_FACTOR * torch_diff.rel_l2 + 0.01, (diff, torch_diff)
    assert diff.top1_agreement >= torch_diff.top1_agreement - PATH_TOP1_SLACK, (diff, torch_diff)


def test_fp8_on_the_llama3_8b_shape_halves_the_weights_and_grows_the_kv_pool(gpu_report) -> None:
    """Random llama3-8b weights: the FP8 engine's weights take about half the bytes (the
    embeddings and lm_head stay bf16), the profiled KV pool gets the memory they free, and the
    logits stay near bf16's (4 prompts x 16 positions)."""
    free0, total = torch.cuda.mem_get_info()
    util = (total - free0) / total + 0.25  # a quarter of the device on top of what is in use
    opts = dict(device=DEV, gpu_memory_utilization=util, block_size=16, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=2048)
    prompts = random_prompts(4, dummy_config("llama3-8b").vocab_size, 20, 120, seed=1)

    bf16 = LLMEngine.from_model("dummy:llama3-8b", **opts)
    scripts = greedy_scripts(bf16, prompts, 16)
    ref = forced_logits(bf16, prompts, scripts)
    bf16_bytes, bf16_pool = bf16.model.w.nbytes(), bf16.cache.nbytes()
    release(bf16)

    engine = LLMEngine.from_model("dummy:llama3-8b", quantization="fp8", **opts)
    fp8_bytes, fp8_pool = engine.model.w.nbytes(), engine.cache.nbytes()
    assert torch.cuda.memory_allocated() <= util * total, "the FP8 engine went over gpu_memory_utilization"
    held = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # cached, not in use
    got = forced_logits(engine, prompts, scripts)
    release(engine)

    diff = logits_diff(got, ref)
    gib = 2**30
    gpu_report(
        fp8_vs_bf16=diff.as_dict(), weight_gib={"bf16": bf16_bytes / gib, "fp8": fp8_bytes / gib},
        kv_pool_gib={"bf16": bf16_pool / gib, "fp8": fp8_pool / gib}, allocator_held_gib=held / gib,
        device=torch.cuda.get_device_name(),
    )  # fmt: skip
    c = dummy_config("llama3-8b")
    unquantized = 2 * (2 * c.vocab_size * c.hidden_size) + 2 * c.hidden_size * (2 * c.num_layers + 1)  # embed, lm_head, norms
    assert abs(fp8_bytes - (unquantized + (bf16_bytes - unquantized) / 2)) < 0.01 * fp8_bytes
    # Most of it: what the allocator keeps in partly used segments is not the pool's.
    assert fp8_pool - bf16_pool >= 0.6 * (bf16_bytes - fp8_bytes), "the KV pool should get the memory FP8 frees"
    assert diff.rel_l2 <= LLAMA3_8B_MAX_REL_L2 and diff.top1_agreement >= LLAMA3_8B_MIN_TOP1, diff


def test_fp8_engine_against_bf16_on_real_smollm2_weights(smollm2_gguf, smollm2_prompts, smollm2_hf_greedy, smollm2_hf_fp32, gpu_report) -> None:
    """Teacher-forced along transformers' fp32 greedy answers; FP8 against the bf16 engine,
    and both against transformers' fp32 logits."""
    opts = dict(device=DEV, num_blocks=256, block_size=16, max_num_seqs=8, max_num_batched_tokens=256)
    bf16 = LLMEngine.from_model(str(smollm2_gguf), **opts)
    ref = forced_logits(bf16, smollm2_prompts, smollm2_hf_greedy)
    release(bf16)
    engine = LLMEngine.from_model(str(smollm2_gguf), quantization="fp8", **opts)
    assert all(isinstance(layer.qkv, fp8.Fp8Weight) for layer in engine.model.w.layers)  # 576 / 960 / 1536: all multiples of 16
    got = forced_logits(engine, smollm2_prompts, smollm2_hf_greedy)
    release(engine)
    truth = hf_forced_logits(smollm2_hf_fp32, smollm2_prompts, smollm2_hf_greedy)
    diff = logits_diff(got, ref)
    gpu_report(fp8_vs_bf16=diff.as_dict(), fp8_vs_fp32=logits_diff(got, truth).as_dict(), bf16_vs_fp32=logits_diff(ref, truth).as_dict())
    assert diff.rel_l2 <= SMOLLM2_MAX_REL_L2 and diff.top1_agreement >= SMOLLM2_MIN_TOP1, diff
