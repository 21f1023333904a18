"""Paged attention over the block pool.

`AttentionMetadata` describes one engine step's batch, prefills first, then decodes: where each
new token's K/V goes (slot_mapping), each sequence's block table and context length, and where
each prefill's query rows start. The tensors live on the model's device; the few numbers the
torch path loops over are also kept as host lists, so nothing here reads back from the GPU.

Two implementations of the `PagedAttention` call:
- `TorchPagedAttention`: plain torch (CPU, what CI runs): gathers each sequence's K/V by block
  table and calls scaled_dot_product_attention.
- `TritonPagedAttention` (CUDA): one Triton launch writes K/V, then the varlen prefill kernel
  and the GQA split-K decode kernel of `triton_kernels` read the pool in place.

An FP8 pool (`kv_cache_dtype: fp8`) goes through the same code in both: the write quantizes
with the layer's K and V scales and every read dequantizes to the compute dtype
(kv_cache.quantize_kv / dequantize_kv; the kernels inline the same arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from backends.paged.kv_cache import dequantize_kv, fp8_scale, is_fp8, quantize_kv


@dataclass
class AttentionMetadata:
    """One step's batch layout. Sequences are laid out prefills first, then decodes."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token; -1 = none
    block_tables: torch.Tensor  # [S, W] int32: each sequence's blocks (prefills, then decodes), zero-padded
    context_lens: torch.Tensor  # [S] int32: cached tokens after this step, the new ones included
    query_starts: torch.Tensor  # [P + 1] int32: row of each prefill's first new token (and the end)
    num_prefills: int  # P: sequences with more than one new token (prompts or chunks of them)
    num_prefill_tokens: int  # decode rows start here
    num_decodes: int  # D: sequences with one new token
    max_query_len: int = 1  # over the prefills
    # Host copies for the torch path (no device -> host reads there).
    prefill_query_lens: list[int] = field(default_factory=list)
    prefill_context_lens: list[int] = field(default_factory=list)
    decode_context_lens: list[int] = field(default_factory=list)
    decode_splits: int = 1  # split-K factor of the Triton decode kernel (fixed per CUDA graph)


class PagedAttention(Protocol):
    """Writes this step's K/V into the pool and attends over each sequence's cached context."""

    def __call__(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        k_scale: torch.Tensor | None = None,  # float32 scalars: the layer's FP8 scales (FP8 caches need them)
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor: ...  # [T, num_heads, head_dim]


def _store(flat: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None) -> None:
    """x [n, nkv, hd] into the flat pool [slots, nkv, hd] at `slots`, quantized for an FP8 pool.
    FP8 rows are copied as bytes: torch has no float8 index_copy_ on the CPU."""
    if is_fp8(flat.dtype):
        flat.view(torch.uint8).index_copy_(0, slots, quantize_kv(x, fp8_scale(scale)).view(torch.uint8))
    else:
        flat.index_copy_(0, slots, x)


def _gather(flat: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The pool's rows at `slots`, in `dtype` (an FP8 pool's dequantized; gathered as bytes,
    which every device's index_select takes)."""
    if is_fp8(flat.dtype):
        return dequantize_kv(flat.view(torch.uint8).index_select(0, slots).view(flat.dtype), fp8_scale(scale), dtype)
    return flat.index_select(0, slots)



def _context_slots(block_row: torch.Tensor, ctx: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of the first ctx tokens of a sequence with block table row block_row."""
    nb = -(-ctx // block_size)
    bt = block_row[:nb].long()
    return (bt[:, None] * block_size + torch.arange(block_size, device=bt.device)[None, :]).reshape(-1)[:ctx]


class TorchPagedAttention:
    """Reference paged attention in plain torch (CPU or any device)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T, _, hd = q.shape
        nkv, g = self.num_kv_heads, self.group
        bs = k_cache.shape[1]
        k_flat = k_cache.view(-1, nkv, hd)
        v_flat = v_cache.view(-1, nkv, hd)
        slots = meta.slot_mapping
        if bool((slots < 0).any()):  # padding rows own no slot
            keep = slots >= 0
            slots, k, v = slots[keep], k[keep], v[keep]
        _store(k_flat, slots, k, k_scale)
        _store(v_flat, slots, v, v_scale)
        out = torch.empty_like(q)

        start = 0
        for i, (qlen, ctx) in enumerate(zip(meta.prefill_query_lens, meta.prefill_context_lens)):
            ctx_slots = _context_slots(meta.block_tables[i], ctx, bs)
            # GQA without copying K/V per query head: fold the heads that share a KV head into the
            # query-length dimension, [nkv, g * qlen, hd].
            qs = q[start : start + qlen].view(qlen, nkv, g, hd).permute(1, 2, 0, 3).reshape(nkv, g * qlen, hd)
            ks = _gather(k_flat, ctx_slots, k_scale, q.dtype).transpose(0, 1)  # [nkv, ctx, hd]
            vs = _gather(v_flat, ctx_slots, v_scale, q.dtype).transpose(0, 1)
            # Query j sits at position ctx - qlen + j and sees keys up to it.
            qpos = torch.arange(ctx - qlen, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]  # [qlen, ctx]
            mask = mask.repeat(g, 1)  # rows ordered (group, qlen) like qs
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale)
            out[start : start + qlen] = o.view(nkv, g, qlen, hd).permute(2, 0, 1, 3).reshape(qlen, nkv * g, hd)
            start += qlen

        if meta.num_decodes:
            B = meta.num_decodes
            P = meta.num_prefills
            d0 = meta.num_prefill_tokens
            # Without host lengths (a graph-captured step) read the whole table; the mask
            # built from the device lengths keeps it exact.
            width = max(meta.decode_context_lens) if meta.decode_context_lens else meta.block_tables.shape[1] * bs
            nb = -(-width // bs)
            bt = meta.block_tables[P : P + B, :nb].long()
            slots = (bt[:, :, None] * bs + torch.arange(bs, device=bt.device)).reshape(B, -1)[:, :width]
            ctx = meta.context_lens[P : P + B].to(torch.long)
            mask = (torch.arange(width, device=q.device)[None, :] < ctx[:, None])[:, None, None, :]
            qd = q[d0 : d0 + B].view(B, nkv, g, hd)  # the g heads of a KV head act as g queries
            flat = slots.reshape(-1)
            ks = _gather(k_flat, flat, k_scale, q.dtype).view(B, width, nkv, hd).transpose(1, 2)  # [B, nkv, S, hd]
            vs = _gather(v_flat, flat, v_scale, q.dtype).view(B, width, nkv, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, ks, vs, attn_mask=mask, scale=self.scale)
            out[d0 : d0 + B] = o.reshape(B, nkv * g, hd)
        return out


class TritonPagedAttention:
    """Paged attention with the Triton kernels (CUDA; or CPU under TRITON_INTERPRET=1).

    Reads only device tensors from the metadata and Python ints, so a decode step can be
    captured in a CUDA graph."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        from backends.paged import triton_kernels, triton_ops  # triton is imported only here

        self._kernels = triton_kernels
        self._write_kv = triton_ops.write_kv_cache
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim**-0.5
        self._sms: int | None = None

    def decode_splits(self, batch: int, max_context: int, device: torch.device) -> int:
        """Split-K factor for a decode batch (enough programs to fill the GPU), rounded up to a
        power of two: it is a compile-time constant of the kernel, so few values mean few
        compilations (and CUDA graphs of neighbouring sizes share them)."""
        if self._sms is None:
            self._sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        splits = self._kernels.decode_splits(batch, self.num_kv_heads, max_context, self._sms)
        return min(32, 1 << (splits - 1).bit_length())

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty_like(q)
        P, D, d0 = meta.num_prefills, meta.num_decodes, meta.num_prefill_tokens
        if P:
            self._kernels.paged_prefill_attention(
                q[:d0], k_cache, v_cache, meta.query_starts, meta.context_lens[:P], meta.block_tables[:P],
                meta.max_query_len, self.scale, out=out[:d0], k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip
        if D:
            self._kernels.paged_decode_attention(
                q[d0 : d0 + D], k_cache, v_cache, meta.block_tables[P : P + D], meta.context_lens[P : P + D],
                self.scale, num_splits=meta.decode_splits, out=out[d0 : d0 + D], k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip
        return out

