"""The KV cache: one pool of fixed-size blocks per layer, sized from a memory budget.

The pool's dtype is the model's (`kv_cache_dtype: auto`) or float8_e4m3fn (`kv_cache_dtype:
fp8`), which halves a bf16 pool's bytes per block and so doubles the blocks a budget buys. An
FP8 pool has one float32 scale per layer for K and one for V: a value x is stored as
clamp(x / scale, -448, 448) in e4m3 and read back as fp8.float() * scale (`quantize_kv`,
`dequantize_kv`; the Triton K/V write and attention kernels do the same arithmetic).
"""

from __future__ import annotations

import torch

from backends.paged.config import ModelConfig
from backends.paged.fp8 import FP8_DTYPE, FP8_MAX


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V for one block of tokens across all layers, in the cache's dtype `dtype`."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """How many blocks of a `dtype` cache fit in budget_bytes (at least 1 so a misconfiguration
    fails loudly later)."""
    return max(1, budget_bytes // bytes_per_block(config, block_size, dtype))


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a cache of this dtype stores scaled FP8 values (`kv_cache_dtype: fp8`)."""
    return dtype == FP8_DTYPE


def fp8_scale(scale: torch.Tensor | None) -> torch.Tensor:
    """An FP8 pool's K or V scale, which every write and read of it needs (KVCache.k_scale /
    v_scale); a missing one is a caller's bug, raised as ValueError."""
    if scale is None:
        raise ValueError("an FP8 KV cache needs its layer's K and V scales (KVCache.k_scale / v_scale)")
    return scale


def kernel_scale_args(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """A Triton kernel's (KV_FP8, K scale, V scale) arguments: an FP8 pool's scales; for any
    other pool the caches stand in as pointers the kernel never reads."""
    if not is_fp8(k_cache.dtype):
        return False, k_cache, v_cache
    return True, fp8_scale(k_scale), fp8_scale(v_scale)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """K or V rows in the FP8 cache's format: x / scale in float32, clamped to e4m3's finite
    range (e4m3fn has no infinity; what a cast does past 448 differs between builds), rounded
    to the nearest e4m3 value."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 cache values back to `dtype` (the attention's compute dtype): x * scale in float32."""
    return (x.float() * scale).to(dtype)


class KVCache:
    """K and V block pools, per layer: [num_blocks, block_size, num_kv_heads, head_dim] of
    `dtype`; and per layer a K and a V scale (float32 scalars, read only by an FP8 pool)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        # One scale per layer and tensor, 1.0, as vLLM runs an FP8 cache without calibrated
        # scales: e4m3 reaches 448, past the K and V values of the Llama-family models served
        # here (the huge outliers live in the residual stream, not in K/V), and keeps 3
        # mantissa bits at any magnitude from 2^-6 up, so unscaled values keep their relative
        # precision. The scales exist so that calibrated ones can be loaded later: they are
        # device tensors the kernels read (no host sync; CUDA graphs read them in place).
        self.k_scale = [torch.ones((), dtype=torch.float32, device=device) for _ in range(config.num_layers)]
        self.v_scale = [torch.ones((), dtype=torch.float32, device=device) for _ in range(config.num_layers)]

    def nbytes(self) -> int:
        """Bytes of the K and V pools (the scales are negligible and not counted)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
