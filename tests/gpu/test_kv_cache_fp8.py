"""`kv_cache_dtype: fp8` on the GPU (skipped without CUDA, or on a GPU without FP8 support).

- The kernels: the Triton K/V write against kv_cache.quantize_kv (the torch path's), and the
  Triton decode and prefill kernels over FP8 pools against a float32 reference over the
  dequantized pools.
- The engine: teacher-forced logits of the FP8-KV engine (Triton kernels, CUDA graphs, async
  scheduling) against the bf16-KV engine's on a mid-sized random model, and the plain-torch
  FP8-KV path on the same GPU as a second reference; the profiled pool of `dummy:llama3-1b`
  (twice the blocks in the same memory); the real SmolLM2 GGUF (TURNOUT_SMOLLM2_GGUF).

How close an FP8 cache can be. e4m3 keeps 3 mantissa bits: each stored K and V element carries
~2.65 % RMS relative error whatever its scale (measured on the mid model's K/V, whose RMS is
~1.0, far from both ends of e4m3's range, so scales other than 1.0 change nothing). On the CPU
(the same arithmetic as the torch path here; this file's protocol with the CPU standing in for
the GPU) FP8 K/V moved bf16 logits by 2.7 % relative L2 with 95.3 % top-1 agreement on the mid
random model (256 positions), and by 6.4 % / 93 % on the real SmolLM2-135M over conftest.CHATS
(30 layers amplify it; calibrating per-layer scales from the K/V amax gave the same 6 %). So the
3 % / 97 % target is met in relative L2 on the mid random model but not in top-1 agreement
(random weights' top logits are near-ties), and on SmolLM2 in neither; the bounds below are the
CPU figures with margin. What tells a right FP8 cache from a wrong one: the Triton path must be
about as close to bf16 as the plain-torch path on the same GPU; a scale or layout error, or
garbage context, gives logits tens of percent off (tests/unit/paged/test_kv_cache_fp8.py: 52 %
for a scrambled context); every figure is recorded (TURNOUT_GPU_REPORT).
"""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a GPU with FP8 support (compute capability 8.9+) for Triton's float8e4nv", allow_module_level=True)

from backends.generation import GenerationRequest, SamplingParams  # noqa: E402
from backends.paged.engine import LLMEngine  # noqa: E402
from backends.paged.fp8 import FP8_DTYPE  # noqa: E402
from backends.paged.kv_cache import dequantize_kv, quantize_kv  # noqa: E402
from backends.paged.tokenizer import ByteTokenizer  # noqa: E402
from backends.paged.triton_kernels import paged_decode_attention, paged_prefill_attention  # noqa: E402
from backends.paged.triton_ops import write_kv_cache  # noqa: E402
from tests.gpu.scoring import forced_logits, logits_diff, release  # noqa: E402
from tests.gpu.test_fp8 import MID  # noqa: E402  (Llama 3's proportions at a quarter of 8B's width)
from tests.gpu.test_triton_kernels import SHAPES, gather, make_cache, reference, rel_err  # noqa: E402

DEV = "cuda"

# FP8 K/V against bf16 K/V (the module docstring says where these come from).
MID_MAX_REL_L2, MID_MIN_TOP1 = 0.04, 0.90
SMOLLM2_MAX_REL_L2, SMOLLM2_MIN_TOP1 = 0.09, 0.88
# The Triton + CUDA-graph path against the plain-torch path, each against bf16 K/V.
PATH_REL_L2_FACTOR, PATH_TOP1_SLACK = 1.5, 0.05



def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=DEV)


def byte_rows(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat[index] of an FP8 tensor, indexed as bytes (every device indexes uint8)."""
    return flat.view(torch.uint8)[index].view(FP8_DTYPE)


def fp8_pools(k: torch.Tensor, v: torch.Tensor, k_scale: float, v_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 copies of random pools (the torch quantizer) and their scale tensors."""
    ks, vs = scalar(k_scale), scalar(v_scale)
    return quantize_kv(k, ks), quantize_kv(v, vs), ks, vs


# -- kernels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize(("nkv", "hd"), [(2, 64), (8, 128), (1, 128)])
def test_triton_kv_write_quantizes_like_torch(scale: float, nkv: int, hd: int) -> None:
    g = torch.Generator(device=DEV).manual_seed(nkv * hd)
    T, num_blocks, bs = 37, 16, 16
    qkv = torch.randn((T, 3 * nkv * hd), generator=g, device=DEV).to(torch.bfloat16) * 3
    k, v = qkv[:, : nkv * hd].view(T, nkv, hd), qkv[:, nkv * hd : 2 * nkv * hd].view(T, nkv, hd)  # strided views, as the model passes
    k[0, 0, 0] = 5000.0  # past e4m3's range at any of these scales: saturates
    slots = torch.randperm(num_blocks * bs, generator=g, device=DEV)[:T]
    slots[3] = -1  # a padding row writes nothing
    k8 = torch.zeros((num_blocks, bs, nkv, hd), dtype=FP8_DTYPE, device=DEV)
    v8 = torch.zeros_like(k8)
    ks, vs = scalar(scale), scalar(2 * scale)
    write_kv_cache(k, v, k8, v8, slots, ks, vs)
    keep = slots >= 0
    for cache, x, s in ((k8, k, ks), (v8, v, vs)):
        flat = cache.view(-1, nkv, hd)
        got = dequantize_kv(byte_rows(flat, slots[keep]), s, torch.float32)
        want = dequantize_kv(quantize_kv(x[keep], s), s, torch.float32)
        # Triton's float32 division may round differently in the last bit, which moves a value
        # on an e4m3 rounding boundary by one step: allow that, rarely.
        differ = (got != want).float().mean().item()
        assert differ <= (0.0 if scale == 1.0 else 1e-3), differ
        assert ((got - want).abs() <= 2.0**-3 * want.abs() + 2.0**-9 * float(s)).all()
        written = torch.zeros(flat.shape[0], dtype=torch.bool, device=DEV)
        written[slots[keep]] = True
        assert not flat.view(torch.uint8)[~written].any(), "the write touched other slots"
    assert float(byte_rows(k8.view(-1, nkv, hd), slots[:1])[0, 0, 0].float()) == 448.0  # saturated, not NaN


@pytest.mark.parametrize(("head_dim", "group", "block_size"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_over_an_fp8_pool_matches_reference(head_dim: int, group: int, block_size: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(head_dim * 100 + group * 10 + block_size)
    kvh = 2
    h = kvh * group
    lens = [1, 5, 16, 17, 100, 513, 1030, 2049]
    random.Random(0).shuffle(lens)
    k, v, tables = make_cache(lens, kvh, head_dim, block_size, dtype, gen)
    k8, v8, ks, vs = fp8_pools(k, v, 0.5, 1.5)
    kd, vd = dequantize_kv(k8, ks, torch.float32), dequantize_kv(v8, vs, torch.float32)
    q = torch.randn((len(lens), h, head_dim), generator=gen).to(DEV, dtype)
    scale = head_dim**-0.5
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k8, v8, tables, ctx, scale, num_splits=splits, out=out, k_scale=ks, v_scale=vs)
        for i, n in enumerate(lens):
            ref = reference(q[i : i + 1], gather(kd, tables[i], n), gather(vd, tables[i], n), scale)
            assert rel_err(out[i : i + 1], ref) < 2e-2, (i, n, splits)
    with pytest.raises(ValueError, match="needs its layer's K and V scales"):
        paged_decode_attention(q, k8, v8, tables, ctx, scale)


@pytest.mark.parametrize(("head_dim", "group", "block_size"), SHAPES)
def test_prefill_over_an_fp8_pool_matches_reference(head_dim: int, group: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(7 + head_dim + group + block_size)
    kvh = 2
    h = kvh * group
    plan = [(0, 1), (0, 37), (16, 16), (100, 200), (0, 300), (513, 7), (64, 129)]  # (cached prefix, new tokens)
    lens = [p + n for p, n in plan]
    k, v, tables = make_cache(lens, kvh, head_dim, block_size, torch.bfloat16, gen)
    k8, v8, ks, vs = fp8_pools(k, v, 0.5, 0.25)
    kd, vd = dequantize_kv(k8, ks, torch.float32), dequantize_kv(v8, vs, torch.float32)
    qlens = [n for _, n in plan]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    q = torch.randn((starts[-1], h, head_dim), generator=gen).to(DEV, torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    paged_prefill_attention(
        q, k8, v8,
        torch.tensor(starts, dtype=torch.int32, device=DEV),
        torch.tensor(lens, dtype=torch.int32, device=DEV),
        tables, max(qlens), scale, out=out, k_scale=ks, v_scale=vs,
    )  # fmt: skip
    for i, n in enumerate(lens):
        ref = reference(q[starts[i] : starts[i + 1]], gather(kd, tables[i], n), gather(vd, tables[i], n), scale)
        assert rel_err(out[starts[i] : starts[i + 1]], ref) < 2e-2, (i, plan[i])


# -- engines ---------------------------------------------------------------------------------------


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


def test_fp8_kv_engine_against_bf16_kv_on_a_mid_sized_random_model(gpu_report) -> None:
    """8 prompts x 32 positions (the last prompt position and 31 decodes), in one batch; the
    prompts of up to 200 tokens are chunked (512 tokens a step) over cached prefixes."""
    bf16 = mid_engine()
    prompts = random_prompts(8, MID.vocab_size, 20, 200, seed=0)
    scripts = greedy_scripts(bf16, prompts, 32)
    ref = forced_logits(bf16, prompts, scripts)
    bf16_pool = bf16.cache.nbytes()
    release(bf16)

    engine = mid_engine(kv_cache_dtype="fp8")
    assert engine.kernels == "triton" and engine.graphs is not None and engine.async_scheduling
    assert all(t.dtype == FP8_DTYPE for t in engine.cache.k + engine.cache.v) and engine.dtype == torch.bfloat16
    got = forced_logits(engine, prompts, scripts)
    assert engine.counters.graph_steps > 0, "decode steps should replay CUDA graphs"
    fp8_pool = engine.cache.nbytes()
    release(engine)

    # The plain-torch FP8-KV path on the same GPU (torch attention, no graphs).
    reference_engine = mid_engine(kv_cache_dtype="fp8", kernels="torch", enforce_eager=True)
    torch_path = forced_logits(reference_engine, prompts, scripts)
    release(reference_engine)

    diff, torch_diff = logits_diff(got, ref), logits_diff(torch_path, ref)
    gpu_report(fp8_kv_vs_bf16_kv=diff.as_dict(), torch_path_fp8_kv_vs_bf16_kv=torch_diff.as_dict(),
               triton_vs_torch_path=logits_diff(got, torch_path).as_dict(), pool_bytes={"bf16": bf16_pool, "fp8": fp8_pool})  # fmt: skip
    assert 2 * fp8_pool == bf16_pool  # the same 512 blocks at one byte an element
    assert diff.rel_l2 <= MID_MAX_REL_L2 and diff.top1_agreement >= MID_MIN_TOP1, diff
    assert diff.rel_l2 <= PATH_REL_L2_FACTOR * torch_diff.rel_l2 + 0.01, (diff, torch_diff)
    assert diff.top1_agreement >= torch_diff.top1_agreement - PATH_TOP1_SLACK, (diff, torch_diff)


def test_the_profiled_pool_holds_twice_the_blocks_with_fp8_kv(gpu_report) -> None:
    """`dummy:llama3-1b` in a quarter of the device: the profile sizes the pool in the cache's
    dtype, so the same memory holds twice the blocks (and the engine stays inside
    gpu_memory_utilization); the stats report them."""
    free0, total = torch.cuda.mem_get_info()
    util = (total - free0) / total + 0.25
    opts = dict(device=DEV, gpu_memory_utilization=util, block_size=16, max_num_seqs=16, max_num_batched_tokens=512, max_model_len=2048)
    bf16 = LLMEngine.from_model("dummy:llama3-1b", **opts)
    bf16_blocks, bf16_bytes = bf16.runner.num_blocks, bf16.cache.nbytes()
    release(bf16)
    engine = LLMEngine.from_model("dummy:llama3-1b", kv_cache_dtype="fp8", **opts)
    assert torch.cuda.memory_allocated() <= util * total, "the FP8-KV engine went over gpu_memory_utilization"
    fp8_blocks, fp8_bytes = engine.runner.num_blocks, engine.cache.nbytes()
    assert engine.stats()["turnout:paged_kv_total_blocks"] == fp8_blocks
    out = greedy_scripts(engine, random_prompts(4, engine.config.vocab_size, 20, 100, seed=2), 8)
    release(engine)
    gpu_report(blocks={"bf16": bf16_blocks, "fp8": fp8_blocks}, pool_gib={"bf16": bf16_bytes / 2**30, "fp8": fp8_bytes / 2**30})
    assert all(len(o) == 8 for o in out)
    assert 1.9 <= fp8_blocks / bf16_blocks <= 2.1, (bf16_blocks, fp8_blocks)


def test_fp8_kv_engine_against_bf16_kv_on_real_smollm2_weights(smollm2_gguf, smollm2_prompts, smollm2_hf_greedy, gpu_report) -> None:
    """Teacher-forced along transformers' fp32 greedy answers (conftest): FP8 K/V against
    bf16 K/V, both computing in bf16."""
    opts = dict(device=DEV, num_blocks=256, block_size=16, max_num_seqs=8, max_num_batched_tokens=256)
    bf16 = LLMEngine.from_model(str(smollm2_gguf), **opts)
    ref = forced_logits(bf16, smollm2_prompts, smollm2_hf_greedy)
    release(bf16)
    engine = LLMEngine.from_model(str(smollm2_gguf), kv_cache_dtype="fp8", **opts)
    got = forced_logits(engine, smollm2_prompts, smollm2_hf_greedy)
    release(engine)
    diff = logits_diff(got, ref)
    gpu_report(fp8_kv_vs_bf16_kv=diff.as_dict())
    assert diff.rel_l2 <= SMOLLM2_MAX_REL_L2 and diff.top1_agreement >= SMOLLM2_MIN_TOP1, diff
