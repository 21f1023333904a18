"""`kv_cache_dtype: fp8` on the CPU: the option's values, the pool's bytes per block and the
blocks a budget buys, the torch path's quantizing write and dequantizing read, and engines
with an FP8 pool against the model-dtype one (teacher-forced logits, greedy tokens, prefix
caching, tensor parallelism over two gloo ranks). The Triton kernels, CUDA graphs and the
larger shapes are tests/gpu/test_kv_cache_fp8.py."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.attention import AttentionMetadata, TorchPagedAttention
from backends.paged.config import dummy_config
from backends.paged.engine import LLMEngine
from backends.paged.fp8 import FP8_DTYPE, FP8_MAX
from backends.paged.kv_cache import KVCache, bytes_per_block, dequantize_kv, num_blocks_for_budget, quantize_kv
from backends.paged.options import EngineOptions
from tests.gpu.scoring import forced_logits, logits_diff

from .conftest import assert_blocks_all_free

TINY = dummy_config("tiny")
# e4m3: a normal value within 2^-4 of itself, a subnormal (below 2^-6) within 2^-10 absolute,
# both in units of the scale.
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the option ------------------------------------------------------------------------------------


def test_kv_cache_dtype_option_values() -> None:
    assert EngineOptions().kv_cache_dtype == "auto"
    assert EngineOptions().kv_cache_torch_dtype(torch.bfloat16) == torch.bfloat16
    for value in ("fp8", "fp8_e4m3"):
        opts = EngineOptions.from_dict({"kv_cache_dtype": value})  # the CPU (the default device) included
        assert opts.kv_cache_torch_dtype(torch.float32) == FP8_DTYPE
    # With FP8 weights too: the two options are independent.
    assert EngineOptions.from_dict({"kv_cache_dtype": "fp8", "quantization": "fp8", "device": "cuda"}).kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match=r"kv_cache_dtype: Input should be 'auto', 'fp8' or 'fp8_e4m3'"):
        EngineOptions.from_dict({"kv_cache_dtype": "int4"})


def test_a_policy_with_an_unknown_kv_cache_dtype_fails_the_check() -> None:
    from gateway.registry import check_options
    from policies.schema import ConfigError, parse_config

    policy = "backends:\n  - name: node\n    kind: paged\n    model: dummy:tiny\n    options:\n      kv_cache_dtype: {value}\n"
    good = policy.format(value="fp8")
    check_options(parse_config(good, source="x.yaml"), good, source="x.yaml")
    bad = policy.format(value="int8")
    with pytest.raises(ConfigError, match=r"x.yaml:6: backends.0.options.kv_cache_dtype: Input should be 'auto', 'fp8' or 'fp8_e4m3'"):
        check_options(parse_config(bad, source="x.yaml"), bad, source="x.yaml")


# -- sizing ------------------------------------------------------------------------------------------


def test_an_fp8_block_is_half_a_bf16_one_and_a_budget_buys_twice_the_blocks() -> None:
    bs = 16
    fp8, bf16, fp32 = (bytes_per_block(TINY, bs, d) for d in (FP8_DTYPE, torch.bfloat16, torch.float32))
    assert fp8 == 2 * TINY.num_layers * bs * TINY.num_kv_heads * TINY.head_dim  # one byte an element
    assert 2 * fp8 == bf16 and 4 * fp8 == fp32
    budget = 1 << 20
    assert num_blocks_for_budget(TINY, bs, FP8_DTYPE, budget) == 2 * num_blocks_for_budget(TINY, bs, torch.bfloat16, budget)
    cache = KVCache(TINY, 8, bs, FP8_DTYPE, torch.device("cpu"))
    assert cache.nbytes() == 8 * fp8
    assert all(t.dtype == FP8_DTYPE for t in cache.k + cache.v)
    assert all(s.dtype == torch.float32 and s.shape == () and float(s) == 1.0 for s in cache.k_scale + cache.v_scale)


def test_the_engine_sizes_its_pool_in_the_cache_dtype(make_engine) -> None:
    """kv_cache_gib buys 4x the blocks of an fp32 pool and 2x a bf16 one; stats (LoadReport's
    source) report them."""
    gib = 1 / 1024  # 1 MiB
    fp32 = make_engine(kv_cache_gib=gib, max_model_len=256)
    bf16 = make_engine(kv_cache_gib=gib, max_model_len=256, dtype="bfloat16")
    fp8 = make_engine(kv_cache_gib=gib, max_model_len=256, kv_cache_dtype="fp8")
    assert fp8.runner.num_blocks == 4 * fp32.runner.num_blocks == 2 * bf16.runner.num_blocks
    assert fp8.stats()["turnout:paged_kv_total_blocks"] == fp8.runner.num_blocks
    assert fp8.cache.nbytes() == fp32.cache.nbytes() and fp8.runner.kv_cache_dtype == FP8_DTYPE
    assert fp8.dtype == torch.float32  # the model still computes in its own dtype


# -- the torch path's write and read -------------------------------------------------------------


def test_quantize_kv_round_trip_is_within_e4m3_error() -> None:
    x = torch.randn(64, 2, 16, generator=gen(0)) * torch.logspace(-2, 1, 16)  # several magnitudes
    for s in (1.0, 0.25, 3.0):
        scale = torch.tensor(s)
        q = quantize_kv(x, scale)
        assert q.dtype == FP8_DTYPE
        back = dequantize_kv(q, scale, torch.float32)
        bound = (E4M3_REL * x.abs() + E4M3_SUBNORMAL_ABS * s) * 1.0001
        assert bool(((back - x).abs() <= bound).all())
    # Past e4m3's range (in units of the scale) a value saturates instead of becoming NaN.
    big = torch.tensor([1e4, -1e4, 500.0])
    assert dequantize_kv(quantize_kv(big, torch.tensor(1.0)), torch.tensor(1.0), torch.float32).tolist() == [FP8_MAX, -FP8_MAX, FP8_MAX]
    # A scale maps them into range: 80 and 4 are e4m3 values.
    assert dequantize_kv(quantize_kv(big, torch.tensor(125.0)), torch.tensor(125.0), torch.float32).tolist() == [1e4, -1e4, 500.0]


def _one_sequence_meta(n: int, block_size: int, table: list[int]) -> AttentionMetadata:
    """A step that prefills one sequence of n tokens into the given blocks."""
    slots = [table[p // block_size] * block_size + p % block_size for p in range(n)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([table], dtype=torch.int32),
        context_lens=torch.tensor([n], dtype=torch.int32),
        query_starts=torch.tensor([0, n], dtype=torch.int32),
        num_prefills=1,
        num_prefill_tokens=n,
        num_decodes=0,
        max_query_len=n,
        prefill_query_lens=[n],
        prefill_context_lens=[n],
    )


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_torch_attention_writes_quantized_kv_and_reads_it_dequantized(compute: torch.dtype) -> None:
    """The write stores quantize_kv(k, scale) bytes at the step's slots (and nothing else), and
    attention over the FP8 pool equals attention over a pool in the compute dtype holding the
    dequantized values: the read's one difference is the dequantization."""
    bs, n, nh, nkv, hd = 4, 11, 4, 2, 16
    table = [5, 1, 7]
    g = gen(1)
    q = torch.randn(n, nh, hd, generator=g).to(compute)
    k = (torch.randn(n, nkv, hd, generator=g) * 2).to(compute)
    v = torch.randn(n, nkv, hd, generator=g).to(compute)
    k_scale, v_scale = torch.tensor(0.5), torch.tensor(2.0)
    attn = TorchPagedAttention(nh, nkv, hd)
    shape = (8, bs, nkv, hd)
    k8, v8 = torch.zeros(shape, dtype=FP8_DTYPE), torch.zeros(shape, dtype=FP8_DTYPE)
    out = attn(q, k, v, k8, v8, _one_sequence_meta(n, bs, table), k_scale, v_scale)

    slots = _one_sequence_meta(n, bs, table).slot_mapping
    stored = k8.view(-1, nkv, hd).view(torch.uint8)
    assert torch.equal(stored[slots], quantize_kv(k, k_scale).view(torch.uint8))
    untouched = torch.ones(stored.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert not stored[untouched].any(), "the write touched other slots"
    back = dequantize_kv(k8.view(-1, nkv, hd)[slots], k_scale, torch.float32)
    assert bool(((back - k.float()).abs() <= E4M3_REL * k.float().abs() + E4M3_SUBNORMAL_ABS * 0.5).all())

    kd, vd = dequantize_kv(k8, k_scale, compute), dequantize_kv(v8, v_scale, compute)
    ref = attn(q, kd.view(-1, nkv, hd)[slots], vd.view(-1, nkv, hd)[slots], kd.clone(), vd.clone(), _one_sequence_meta(n, bs, table))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs its layer's K and V scales"):
        attn(q, k, v, k8, v8, _one_sequence_meta(n, bs, table))


# -- engines ---------------------------------------------------------------------------------------


def random_prompts(n: int, vocab: int, seed: int, lo: int = 8, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def greedy(rid: str, prompt: list[int], n: int) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


def scramble_context(engine: LLMEngine) -> None:
    """A deliberately wrong cache: before each layer's attention, every K/V in the pool is
    replaced by noise of unit scale (the step's own tokens are still written right after)."""
    attn = engine.model.attn
    g = gen(99)

    def scrambled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, *rest: Any) -> torch.Tensor:
        kc.copy_(torch.randn(kc.shape, generator=g).to(kc.dtype))
        vc.copy_(torch.randn(vc.shape, generator=g).to(vc.dtype))
        return attn(q, k, v, kc, vc, *rest)

    engine.model.attn = scrambled


# Measured on dummy:tiny, 48 teacher-forced positions: FP8 K/V moved the logits 1.5 % (relative
# L2) from the fp32 pool's with 98 % top-1 agreement (1.7 % / 96 % in bf16); computing in bf16
# instead of fp32 moves them 0.8 %; a scrambled context 52 % (46 % agreement).
TINY_MAX_REL_L2, TINY_MIN_TOP1 = 0.05, 0.90


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_an_fp8_pool_gives_logits_close_to_the_model_dtype_pool(make_engine, compute: str) -> None:
    opts: dict[str, Any] = dict(num_blocks=96, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, dtype=compute)
    auto = make_engine(**opts)
    fp8 = make_engine(kv_cache_dtype="fp8", **opts)
    garbage = make_engine(kv_cache_dtype="fp8", **opts)
    scramble_context(garbage)
    assert all(t.dtype == FP8_DTYPE for t in fp8.cache.k + fp8.cache.v)
    assert all(t.dtype == auto.dtype for t in auto.cache.k + auto.cache.v)

    prompts = random_prompts(4, TINY.vocab_size, seed=0, lo=20, hi=60)  # chunked: a budget of 32 tokens a step
    scripts = [s for s in auto.generate_sync([greedy(f"g{i}", p, 12) for i, p in enumerate(prompts)]).values()]
    ref = forced_logits(auto, prompts, scripts)
    got = forced_logits(fp8, prompts, scripts)
    bad = forced_logits(garbage, prompts, scripts)
    diff, bad_diff = logits_diff(got, ref), logits_diff(bad, ref)
    print(f"{compute}: fp8 K/V {diff}; scrambled context {bad_diff}")
    assert diff.rel_l2 < TINY_MAX_REL_L2 and diff.top1_agreement >= TINY_MIN_TOP1, diff
    # The first position (a prefill over the prompt's own K/V, through the FP8 pool) too.
    first = logits_diff([g[:1] for g in got], [r[:1] for r in ref])
    assert first.rel_l2 < TINY_MAX_REL_L2, first
    # What a broken cache looks like, so the bound above is known to catch one.
    assert bad_diff.rel_l2 > 4 * TINY_MAX_REL_L2, bad_diff
    # Greedy on its own: a few tokens of each prompt agree (later ones may part at a near-tie).
    own = fp8.generate_sync([greedy(f"o{i}", p, 4) for i, p in enumerate(prompts)])
    assert sum(own[f"o{i}"] == s[:4] for i, s in enumerate(scripts)) >= 3


def test_prefix_caching_over_an_fp8_pool(make_engine) -> None:
    """A prompt that shares cached FP8 blocks gets the tokens it gets with prefix caching off."""
    system = [1] + list(range(10, 40))
    tails = [[50 + i, 60 + i, 70 + i] for i in range(3)]
    opts: dict[str, Any] = dict(num_blocks=64, block_size=4, kv_cache_dtype="fp8")
    cached = make_engine(**opts)
    plain = make_engine(enable_prefix_caching=False, **opts)
    for i, tail in enumerate(tails):
        got = cached.generate_sync([greedy(f"r{i}", system + tail, 8)])
        assert got == plain.generate_sync([greedy(f"r{i}", system + tail, 8)])
    assert cached.block_manager.prefix_hits > 0 and cached.stats()["vllm:prefix_cache_hits"] > 0
    assert plain.block_manager.prefix_hits == 0


@pytest.mark.timeout(120)
def test_tensor_parallel_ranks_each_hold_an_fp8_pool() -> None:
    """Two gloo ranks, each with its own FP8 pool of its KV heads, against one rank: the same
    greedy tokens, the same block count."""
    threads = torch.get_num_threads()
    opts: dict[str, Any] = dict(block_size=4, num_blocks=40, max_num_batched_tokens=16, max_num_seqs=4, num_threads=1, kv_cache_dtype="fp8")
    one = LLMEngine.from_model("dummy:tiny", **opts)
    two = LLMEngine.from_model("dummy:tiny", tensor_parallel_size=2, **opts)
    try:
        assert two.cache.k[0].dtype == FP8_DTYPE and two.cache.k[0].shape[2] == TINY.num_kv_heads // 2
        assert two.runner.num_blocks == one.runner.num_blocks == 40
        ps = random_prompts(3, TINY.vocab_size, seed=5, lo=10, hi=30)
        ref = one.generate_sync([greedy(f"r{i}", p, 8) for i, p in enumerate(ps)])
        assert two.generate_sync([greedy(f"r{i}", p, 8) for i, p in enumerate(ps)]) == ref
    finally:
        two.close()
        torch.set_num_threads(threads)
    assert_blocks_all_free(one)
    assert_blocks_all_free(two)
