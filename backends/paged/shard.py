"""A rank's slice of each HF-named weight (tensor parallelism; the layout is parallel.py's).

The loaders call `shard_tensor` on each tensor as they read or draw it, so a rank holds its
slice and at most one whole tensor at a time, never the whole model. Packing (q/k/v and
gate/up fused per rank) and FP8 quantization then run on the slices as on a whole model:
quantizing after sharding gives column-parallel layers the same per-output-channel scales as
the unsharded model, and row-parallel ones scales over the rank's slice of the input channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backends.paged.parallel import ShardLayout

# How each kind of tensor is split, by the end of its HF name: dim 0 (rows) or 1 (columns),
# and in units of what.
_ROWS_BY_HEAD = ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
_ROWS_BY_KV_HEAD = ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")
_COLS_BY_HEAD = ("self_attn.o_proj.weight",)
_ROWS_BY_CHANNEL = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_COLS_BY_CHANNEL = ("mlp.down_proj.weight",)
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")

Selector = Callable[[str, torch.Tensor], torch.Tensor]


def _take(t: torch.Tensor, dim: int, r: range, unit: int = 1) -> torch.Tensor:
    """t's slice r (in units of `unit` rows or columns) along dim, as a tensor of its own
    (a view would keep the whole tensor's storage alive)."""
    return t.narrow(dim, r.start * unit, len(r) * unit).clone(memory_format=torch.contiguous_format)


def shard_tensor(name: str, t: torch.Tensor, layout: ShardLayout, head_dim: int) -> torch.Tensor:
    """This rank's part of the weight `name` (HF naming); norms and RoPE factors whole."""
    if name.endswith(_ROWS_BY_HEAD):
        return _take(t, 0, layout.heads, head_dim)
    if name.endswith(_ROWS_BY_KV_HEAD):
        return _take(t, 0, layout.kv_heads, head_dim)
    if name.endswith(_COLS_BY_HEAD):
        return _take(t, 1, layout.heads, head_dim)
    if name.endswith(_ROWS_BY_CHANNEL):
        return _take(t, 0, layout.intermediate)
    if name.endswith(_COLS_BY_CHANNEL):
        return _take(t, 1, layout.intermediate)
    if name in _VOCAB_ROWS:
        return vocab_rows(t, layout)
    return t


def vocab_rows(t: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """This rank's rows of a [V, H] embedding or lm_head, zero rows past the vocabulary (so
    that every rank's slice has vocab_per_rank rows)."""
    r = layout.vocab
    out = t.new_zeros((layout.vocab_per_rank, t.shape[1]))
    end = min(r.stop, t.shape[0])
    if end > r.start:
        out[: end - r.start] = t[r.start : end]
    return out


def selector(layout: ShardLayout | None, head_dim: int) -> Selector | None:
    """The loaders' per-tensor hook for this layout (None: the whole model, one rank)."""
    if layout is None or layout.size == 1:
        return None
    return lambda name, t: shard_tensor(name, t, layout, head_dim)
