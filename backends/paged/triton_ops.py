"""Fused Triton kernels for the decoder's elementwise work on GPU.

Each replaces a chain of small torch ops with one launch, which matters most inside a CUDA
graph for a small model (smollm2-135m: ~45 launches a layer unfused, 11 fused):

- `rms_norm` / `add_rms_norm`: (residual add +) RMSNorm, rounding exactly where HF's torch
  code rounds (the sum to the activation dtype, the normalised row before the weight).
- `silu_and_mul`: SiLU(gate) * up over a fused [T, 2I] gate_up projection.
- `rotary_inplace`: HF rotate-half RoPE on q and k (views into the qkv projection), in place.
- `write_kv_cache`: K and V of the new tokens into their cache slots in one launch; slot -1
  means "no slot" (a CUDA graph's padding rows). An FP8 cache (`kv_cache_dtype: fp8`) gets
  them quantized with the layer's scales, as kv_cache.quantize_kv does.
- `quantize_rows`: dynamic per-token FP8 quantization of a GEMM's input (`quantization: fp8`),
  one launch instead of torch's six (abs, amax, clamp, divide, clamp, cast) before each GEMM.

`TritonOps` bundles them behind the same methods as `model.TorchOps`. This module imports
triton at import time; callers import it only when they use it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.paged.fp8 import FP8_DTYPE, FP8_MAX, MIN_AMAX
from backends.paged.kv_cache import kernel_scale_args


@triton.jit
def _rms_norm_kernel(
    X,
    Res,
    W,
    Y,
    stride_x,
    stride_r,
    stride_y,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Res + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(Res.dtype.element_ty)  # torch rounds the sum to the activation dtype
        tl.store(Res + row * stride_r + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


def _norm_warps(n: int) -> int:
    return 8 if n >= 4096 else (4 if n >= 1024 else 2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x [T, N] (float32 statistics, HF rounding)."""
    T, N = x.shape
    y = torch.empty_like(x)
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(T,)](x, x, weight, y, x.stride(0), x.stride(0), y.stride(0), N, eps,
                           HAS_RESIDUAL=False, BLOCK=block, num_warps=_norm_warps(block))  # fmt: skip
    return y


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place), then RMSNorm of the new residual. Returns (normed, residual)."""
    T, N = x.shape
    y = torch.empty_like(x)
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(T,)](x, residual, weight, y, x.stride(0), residual.stride(0), y.stride(0), N, eps,
                           HAS_RESIDUAL=True, BLOCK=block, num_warps=_norm_warps(block))  # fmt: skip
    return y, residual


@triton.jit
def _silu_and_mul_kernel(X, Y, stride_x, stride_y, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    # Round where torch does: F.silu(gate) is materialised in the activation dtype.
    act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2I] (gate first). Returns [T, I]."""
    T, two_i = gate_up.shape
    inter = two_i // 2
    y = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](gate_up, y, gate_up.stride(0), y.stride(0), inter,
                                                         BLOCK=block, num_warps=4)  # fmt: skip
    return y


@triton.jit
def _rotary_kernel(
    Q,
    K,
    Cos,
    Sin,
    Positions,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Positions + t).to(tl.int64)
    d = tl.arange(0, HALF)
    h = tl.arange(0, HEADS_PAD)
    # cos/sin rows hold the same frequencies twice (cat(freqs, freqs)); the first half suffices.
    c = tl.load(Cos + pos * stride_cos + d).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * stride_cos + d).to(tl.float32)[None, :]
    dt = Q.dtype.element_ty
    # q then k; each half rounded like torch's x * cos + rotate_half(x) * sin in the model dtype.
    qmask = (h < NQ)[:, None]
    qp = Q + t * stride_qt + h[:, None] * stride_qh + d[None, :]
    x1 = tl.load(qp, mask=qmask, other=0.0).to(tl.float32)
    x2 = tl.load(qp + HALF, mask=qmask, other=0.0).to(tl.float32)
    o1 = (x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    tl.store(qp, o1.to(dt), mask=qmask)
    tl.store(qp + HALF, o2.to(dt), mask=qmask)
    kmask = (h < NK)[:, None]
    kp = K + t * stride_kt + h[:, None] * stride_kh + d[None, :]
    y1 = tl.load(kp, mask=kmask, other=0.0).to(tl.float32)
    y2 = tl.load(kp + HALF, mask=kmask, other=0.0).to(tl.float32)
    p1 = (y1 * c).to(dt).to(tl.float32) + (-y2 * s).to(dt).to(tl.float32)
    p2 = (y2 * c).to(dt).to(tl.float32) + (y1 * s).to(dt).to(tl.float32)
    tl.store(kp, p1.to(dt), mask=kmask)
    tl.store(kp + HALF, p2.to(dt), mask=kmask)


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
    """Rotate q [T, NQ, D] and k [T, NK, D] in place (last dim contiguous) by the tables'
    rows [max_pos, D] at `positions` [T]."""
    T, nq, hd = q.shape
    nk = k.shape[1]
    if T == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1
    _rotary_kernel[(T,)](
        q, k, cos, sin, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NQ=nq, NK=nk, HEADS_PAD=triton.next_power_of_2(max(nq, nk)), HALF=hd // 2,
        num_warps=4 if hd * max(nq, nk) >= 2048 else 2,
    )  # fmt: skip


@triton.jit
def _write_kv_kernel(
    K,
    V,
    KCache,
    VCache,
    Slots,
    KScale,  # float32 scalars: the layer's FP8 scales (read only when KV_FP8)
    VScale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    NKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_FP8: tl.constexpr,
    QMAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < NKV
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    if KV_FP8:  # x / scale, clamped to e4m3's finite range, rounded to nearest (kv_cache.quantize_kv)
        k = tl.minimum(tl.maximum(k.to(tl.float32) / tl.load(KScale), -QMAX), QMAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / tl.load(VScale), -QMAX), QMAX)
    dst = slot * stride_cache_slot + h * HEAD_DIM + d
    tl.store(KCache + dst, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + dst, v.to(VCache.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k, v [T, NKV, D] into caches [NB, BS, NKV, D] at flat slots [T] (block * BS + offset);
    rows whose slot is negative are skipped. FP8 caches take k / k_scale and v / v_scale
    (float32 scalar tensors, required for them)."""
    T, nkv, hd = k.shape
    if T == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k.stride(2) == 1 and v.stride(2) == 1
    fp8, ks, vs = kernel_scale_args(k_cache, v_cache, k_scale, v_scale)
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, ks, vs,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1),
        NKV=nkv, HEAD_DIM=hd, HEADS_PAD=triton.next_power_of_2(nkv), KV_FP8=fp8, QMAX=FP8_MAX,
        num_warps=1 if nkv * hd <= 512 else 4,
    )  # fmt: skip


@triton.jit
def _quantize_rows_kernel(X, Y, S, stride_x, stride_y, N, QMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # Two passes over the row (the second from L1/L2): its amax, then the scaled, clamped cast.
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        x = tl.load(X + row * stride_x + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), AMAX_FLOOR) / QMAX
    tl.store(S + row, scale)
    for start in range(0, N, BLOCK):
        mask = start + cols < N
        x = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        # Clamped first, as fp8._to_fp8 does (the division's rounding can step past 448).
        q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
        tl.store(Y + row * stride_y + start + cols, q.to(Y.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 quantization of x [T, K] (last dim contiguous): (x_fp8 [T, K], scale
    [T, 1] float32), as fp8.quantize_rows computes them, in one launch."""
    T, N = x.shape
    assert x.stride(1) == 1
    y = torch.empty((T, N), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x.device)
    if T == 0:
        return y, scale
    block = min(2048, triton.next_power_of_2(N))
    _quantize_rows_kernel[(T,)](x, y, scale, x.stride(0), y.stride(0), N, QMAX=FP8_MAX, AMAX_FLOOR=MIN_AMAX,
                                BLOCK=block, num_warps=4 if block >= 1024 else 2)  # fmt: skip
    return y, scale


class TritonOps:
    """The decoder's elementwise ops as fused Triton kernels (same methods as model.TorchOps)."""

    name = "triton"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, weight, eps)

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rotary_inplace(q, k, cos, sin, positions)
        return q, k

    @staticmethod
    def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows(x)
