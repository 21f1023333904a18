"""Triton kernels for paged attention on GPU.

Cache layout (shared with the torch path): per layer, K and V pools of shape
[num_blocks, block_size, num_kv_heads, head_dim]; a sequence's tokens live in the blocks its
row of `block_tables` names, in order.

- `paged_decode_attention`: one query token per sequence. A program owns one (sequence,
  KV head, split) and computes all the query heads that share that KV head together (GQA:
  each K/V tile is read once for the whole group). Long contexts are split across programs
  (split-K) and merged by log-sum-exp in a second kernel, so a small batch still fills the GPU.
- `paged_prefill_attention`: many query tokens per sequence (a prompt or a chunk of one) over
  the whole cached context, cached prefix included, causal. Varlen: sequences of any lengths
  in one launch.

An FP8 pool (`kv_cache_dtype: fp8`, float8_e4m3fn) is read by the same kernels: with KV_FP8
each K and V tile is only converted to the query's dtype as it is loaded (exact: every e4m3
value is a bf16 value), and the layer's scales are applied once per score and per output row
instead of per element: the K scale folds into the softmax scale, the V scale multiplies the
normalized output. That equals kv_cache.dequantize_kv, the torch path's reading, up to rounding.

This module imports triton at import time; callers import it only when CUDA is available.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from backends.paged.kv_cache import kernel_scale_args

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    Q,  # [B, H, D]
    K,  # [NB, BS, KVH, D]
    V,
    KScale,  # float32 scalars: the layer's FP8 scales (read only when KV_FP8)
    VScale,
    BlockTables,  # [B, MAXB] int32
    ContextLens,  # [B] int32
    MidO,  # [B, H, S, D] float32
    MidLse,  # [B, H, S] float32
    qk_scale,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,  # tokens per iteration, a multiple of BLOCK_SIZE
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 caches (exact fp32 runs), else "tf32" (unused)
    KV_FP8: tl.constexpr,  # the pool is float8_e4m3fn: convert each tile as it is loaded, scale once
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ContextLens + b)
    tiles = tl.cdiv(ctx, TILE)
    tiles_per_split = tl.cdiv(tiles, NUM_SPLITS)
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tiles)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, TILE)
    heads = kvh * GROUP + offs_g
    gmask = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(KScale)
        v_scale = tl.load(VScale)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for t in range(t_start, t_end):
        tok = t * TILE + offs_t
        tmask = tok < ctx
        phys = tl.load(BlockTables + b * stride_bt + tok // BLOCK_SIZE, mask=tmask, other=0)
        slot = tok % BLOCK_SIZE
        k = tl.load(
            K + phys[:, None] * stride_kb + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
            mask=tmask[:, None],
            other=0.0,
        )
        if KV_FP8:
            k = k.to(Q.dtype.element_ty)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, TILE], log2 domain
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(
            V + phys[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
            mask=tmask[:, None],
            other=0.0,
        )
        if KV_FP8:
            v = v.to(Q.dtype.element_ty)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if KV_FP8:
        out = out * v_scale
    lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
    tl.store(
        MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :],
        out,
        mask=gmask[:, None],
    )
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=gmask)


@triton.jit
def _merge_kernel(
    MidO,
    MidLse,
    Out,  # [B, H, D]
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    smask = offs_s < NUM_SPLITS
    lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    o = tl.load(
        MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
        mask=smask[:, None],
        other=0.0,
    )
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def _dot_precision(q: torch.Tensor) -> str:
    """Float32 runs (correctness checks) keep full precision; Triton would use TF32."""
    return "ieee" if q.dtype == torch.float32 else "tf32"



def decode_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Split-K factor: enough programs to fill the GPU, never tiles of under ~256 tokens."""
    programs = batch * num_kv_heads
    if programs >= 2 * num_sms or max_context <= 512:
        return 1
    want = math.ceil(2 * num_sms / programs)
    return max(1, min(want, max_context // 256, 32))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context.

    q: [B, H, D]; caches: [NB, BS, KVH, D]; block_tables: [B, MAXB] int32;
    context_lens: [B] int32 (tokens in the cache, the new one included); k_scale, v_scale:
    float32 scalar tensors, an FP8 cache's scales. Returns [B, H, D].
    """
    fp8, ks, vs = kernel_scale_args(k_cache, v_cache, k_scale, v_scale)
    B, H, D = q.shape
    _, BS, KVH, _ = k_cache.shape
    group = H // KVH
    out = torch.empty_like(q) if out is None else out
    mid_o = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    tile = max(BS, 64 if D <= 64 else 32)
    _decode_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, ks, vs, block_tables, context_lens, mid_o, mid_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_SIZE=BS,
        TILE=tile, NUM_SPLITS=num_splits, DOT_PRECISION=_dot_precision(q), KV_FP8=fp8,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    _merge_kernel[(B, H)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, NUM_SPLITS=num_splits, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        num_warps=1,
    )  # fmt: skip
    return out


@triton.jit
def _prefill_kernel(
    Q,  # [T, H, D]: the new tokens of all sequences, back to back
    K,
    V,
    KScale,  # float32 scalars: the layer's FP8 scales (read only when KV_FP8)
    VScale,
    Out,
    QueryStarts,  # [S + 1] int32: row of each sequence's first new token
    ContextLens,  # [S] int32: cached tokens after this step (prefix + new)
    BlockTables,  # [S, MAXB] int32
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(QueryStarts + seq)
    q_len = tl.load(QueryStarts + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx = tl.load(ContextLens + seq)
    kvh = h // GROUP
    prefix = ctx - q_len  # tokens cached before this step's queries

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    mmask = offs_m < q_len
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=mmask[:, None], other=0.0)
    qpos = prefix + offs_m  # absolute position of each query row
    if KV_FP8:
        qk_scale = qk_scale * tl.load(KScale)
        v_scale = tl.load(VScale)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Keys past the last query row of this tile are never visible: stop there.
    kv_end = tl.minimum(ctx, prefix + (m_block + 1) * BLOCK_M)
    for n0 in range(0, kv_end, BLOCK_N):
        tok = n0 + offs_n
        nmask = tok < kv_end
        phys = tl.load(BlockTables + seq * stride_bt + tok // BLOCK_SIZE, mask=nmask, other=0)
        slot = tok % BLOCK_SIZE
        k = tl.load(
            K + phys[:, None] * stride_kb + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
            mask=nmask[:, None],
            other=0.0,
        )
        if KV_FP8:
            k = k.to(Q.dtype.element_ty)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (tok[None, :] <= qpos[:, None]) & nmask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(
            V + phys[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
            mask=nmask[:, None],
            other=0.0,
        )
        if KV_FP8:
            v = v.to(Q.dtype.element_ty)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * v_scale
    tl.store(
        Out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mmask[:, None],
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context.

    q: [T, H, D] (sequences back to back); query_starts: [S + 1] int32; context_lens: [S]
    int32 (cached tokens including this step's); block_tables: [S, MAXB] int32; k_scale,
    v_scale: float32 scalar tensors, an FP8 cache's scales.
    The new tokens' K/V must already be in the cache. Returns [T, H, D].
    """
    fp8, ks, vs = kernel_scale_args(k_cache, v_cache, k_scale, v_scale)
    T, H, D = q.shape
    _, BS, KVH, _ = k_cache.shape
    S = context_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    block_m = 64 if D > 64 else 128
    block_n = 64
    grid = (triton.cdiv(max_query_len, block_m), S, H)
    _prefill_kernel[grid](
        q, k_cache, v_cache, ks, vs, out, query_starts, context_lens, block_tables,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=H // KVH, HEAD_DIM=D, BLOCK_SIZE=BS, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q), KV_FP8=fp8,
        num_warps=4 if D <= 64 else 8, num_stages=2,
    )  # fmt: skip
    return out
