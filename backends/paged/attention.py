"""Paged attention over the block pool.

`AttentionMetadata` describes one engine step's batch: where each new token's K/V goes
(slot_mapping) and, per sequence, which cache slots make up its context. `TorchPagedAttention`
is the plain-torch implementation CI runs: it gathers each sequence's K/V by block table and
calls scaled_dot_product_attention. A Triton kernel can implement the same `PagedAttention`
interface later, taking the same metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """One step's batch layout. Sequences are laid out prefills first, then decodes."""

    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    # Prefill (or chunked-prefill) sequences, each with >1 new token or with a longer context.
    prefill_query_starts: list[int]  # row offset of each prefill sequence's first new token
    prefill_query_lens: list[int]
    prefill_context_slots: list[torch.Tensor]  # [ctx] long each: slots of the whole context, new tokens included
    # Decodes: one new token each, batched with padding.
    num_prefill_tokens: int  # decode rows start here
    decode_slots: torch.Tensor | None  # [B, max_ctx] long, padded with slot 0
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_ctx] bool: True where a real context token is


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
    ) -> torch.Tensor: ...  # [T, num_heads, head_dim]


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
    ) -> torch.Tensor:
        T, _, hd = q.shape
        nkv, g = self.num_kv_heads, self.group
        k_flat = k_cache.view(-1, nkv, hd)
        v_flat = v_cache.view(-1, nkv, hd)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)

        for start, qlen, slots in zip(meta.prefill_query_starts, meta.prefill_query_lens, meta.prefill_context_slots):
            ctx = slots.numel()
            # GQA without copying K/V per query head: fold the heads that share a KV head into the
            # query-length dimension, [nkv, g * qlen, hd].
            qs = q[start : start + qlen].view(qlen, nkv, g, hd).permute(1, 2, 0, 3).reshape(nkv, g * qlen, hd)
            ks = k_flat.index_select(0, slots).transpose(0, 1)  # [nkv, ctx, hd]
            vs = v_flat.index_select(0, slots).transpose(0, 1)
            # Query j sits at position ctx - qlen + j and sees keys up to it.
            qpos = torch.arange(ctx - qlen, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]  # [qlen, ctx]
            mask = mask.repeat(g, 1)  # rows ordered (group, qlen) like qs
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale)
            out[start : start + qlen] = o.view(nkv, g, qlen, hd).permute(2, 0, 1, 3).reshape(qlen, nkv * g, hd)

        if meta.decode_slots is not None:
            B, S = meta.decode_slots.shape
            d0 = meta.num_prefill_tokens
            qd = q[d0 : d0 + B].view(B, nkv, g, hd)  # the g heads of a KV head act as g queries
            flat = meta.decode_slots.reshape(-1)
            ks = k_flat.index_select(0, flat).view(B, S, nkv, hd).transpose(1, 2)  # [B, nkv, S, hd]
            vs = v_flat.index_select(0, flat).view(B, S, nkv, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, ks, vs, attn_mask=meta.decode_mask, scale=self.scale)
            out[d0 : d0 + B] = o.reshape(B, nkv * g, hd)
        return out
