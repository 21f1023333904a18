"""Triton paged attention against a float32 torch reference, on the GPU (skipped without one)."""

from __future__ import annotations

import math
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from backends.paged.triton_kernels import paged_decode_attention, paged_prefill_attention  # noqa: E402

DEV = "cuda"


def make_cache(lens: list[int], kvh: int, d: int, bs: int, dtype: torch.dtype, gen: torch.Generator):
    """Random K/V pools with each sequence's blocks scattered in a shuffled order."""
    need = [math.ceil(n / bs) for n in lens]
    num_blocks = sum(need) + 7
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros((len(lens), max(need)), dtype=torch.int32)
    i = 0
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor(order[i : i + n])
        i += n
    k = torch.randn((num_blocks, bs, kvh, d), generator=gen).to(DEV, dtype)
    v = torch.randn((num_blocks, bs, kvh, d), generator=gen).to(DEV, dtype)
    return k, v, tables.to(DEV)


def gather(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    bs = cache.shape[1]
    blocks = cache[table[: math.ceil(n / bs)].long()]  # [nb, bs, kvh, d]
    return blocks.reshape(-1, *cache.shape[2:])[:n].float()  # [n, kvh, d]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [m, H, D] at the last m positions of k/v [n, KVH, D]; causal; float32."""
    m, h, _ = q.shape
    n, kvh, _ = k.shape
    k = k.repeat_interleave(h // kvh, dim=1)
    v = v.repeat_interleave(h // kvh, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    qpos = torch.arange(n - m, n, device=q.device)
    s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > qpos[:, None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", s.softmax(-1), v)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


SHAPES = [(d, g, bs) for d in (64, 128) for g in (1, 3, 4, 8) for bs in (16, 32)]


@pytest.mark.parametrize(("head_dim", "group", "block_size"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_reference(head_dim: int, group: int, block_size: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(head_dim * 100 + group * 10 + block_size)
    kvh = 2
    h = kvh * group
    lens = [1, 5, 16, 17, 100, 513, 1030, 2049]
    random.Random(0).shuffle(lens)
    k, v, tables = make_cache(lens, kvh, head_dim, block_size, dtype, gen)
    q = torch.randn((len(lens), h, head_dim), generator=gen).to(DEV, dtype)
    scale = head_dim**-0.5
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k, v, tables, ctx, scale, num_splits=splits, out=out)
        for i, n in enumerate(lens):
            ref = reference(q[i : i + 1], gather(k, tables[i], n), gather(v, tables[i], n), scale)
            assert rel_err(out[i : i + 1], ref) < 2e-2, (i, n, splits)


@pytest.mark.parametrize(("head_dim", "group", "block_size"), SHAPES)
def test_prefill_with_cached_prefix_matches_reference(head_dim: int, group: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(7 + head_dim + group + block_size)
    kvh = 2
    h = kvh * group
    # (cached prefix, new tokens): whole prompts, chunks after a prefix, single tokens
    plan = [(0, 1), (0, 37), (16, 16), (100, 200), (0, 300), (513, 7), (64, 129)]
    lens = [p + n for p, n in plan]
    k, v, tables = make_cache(lens, kvh, head_dim, block_size, torch.bfloat16, gen)
    qlens = [n for _, n in plan]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    q = torch.randn((starts[-1], h, head_dim), generator=gen).to(DEV, torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    paged_prefill_attention(
        q, k, v,
        torch.tensor(starts, dtype=torch.int32, device=DEV),
        torch.tensor(lens, dtype=torch.int32, device=DEV),
        tables, max(qlens), scale, out=out,
    )  # fmt: skip
    for i, n in enumerate(lens):
        ref = reference(q[starts[i] : starts[i + 1]], gather(k, tables[i], n), gather(v, tables[i], n), scale)
        assert rel_err(out[starts[i] : starts[i + 1]], ref) < 2e-2, (i, plan[i])
