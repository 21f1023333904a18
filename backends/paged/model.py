"""The Llama-family decoder: RMSNorm, RoPE (theta and scaling), GQA, SwiGLU, tied or untied
embeddings, optional qkv bias (Qwen2). Runs a flattened batch of new tokens from many
sequences at once; attention reads and writes the paged KV cache. Its linear layers go
through `fp8.linear`, which runs FP8 weights (`quantization: fp8`) and plain ones alike.

Under tensor parallelism (`tp`, parallel.py) the config is the rank's (its heads and MLP
channels) and the weights its slices; the forward pass then adds three collectives: the
vocab-parallel embedding, an all-reduce after the attention output projection and one after
the MLP's down projection, and the logits are gathered to full vocabulary width."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from backends.paged.attention import AttentionMetadata, PagedAttention, TorchPagedAttention
from backends.paged.config import ModelConfig
from backends.paged.fp8 import Fp8Weight, linear, quantize_rows
from backends.paged.kv_cache import KVCache
from backends.paged.parallel import TensorParallel
from backends.paged.weights import ModelWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as HF Llama does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies with the model's theta and scaling (HF's rope_type semantics)."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if freq_factors is not None:  # llama.cpp's rope_freqs tensor (Llama 3.x GGUFs), wherever the weights are
        return inv / freq_factors.float().cpu()
    s = config.rope_scaling or {}
    kind = s.get("rope_type") or s.get("type")
    if kind == "linear":
        return inv / float(s["factor"])
    if kind == "llama3":
        factor = float(s["factor"])
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TorchOps:
    """The decoder's elementwise ops in plain torch (CPU, and the reference for TritonOps)."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x)."""
        residual = residual + x
        return rms_norm(residual, weight, eps), residual

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = cos.index_select(0, positions)[:, None, :]
        s = sin.index_select(0, positions)[:, None, :]
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s

    @staticmethod
    def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token FP8 quantization of an FP8 GEMM's input (fp8.quantize_rows)."""
        return quantize_rows(x)


class LlamaModel:
    """Forward pass over the paged cache. Holds no per-request state.

    `attention` and `ops` pick the implementation: plain torch by default (CPU), the Triton
    paged attention and fused kernels on CUDA (the engine chooses). `tp`: this rank's tensor
    parallel group, with `config` and `weights` the rank's share (ShardLayout.local_config)."""

    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        max_positions: int,
        attention: PagedAttention | None = None,
        ops: Any = None,
        tp: TensorParallel | None = None,
    ) -> None:
        self.config = config
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.w = weights
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.attn = attention or TorchPagedAttention(config.num_heads, config.num_kv_heads, config.head_dim)
        self.ops = ops or TorchOps()
        self._quantize_rows = self.ops.quantize_rows  # FP8 layers' activation quantizer
        inv = rope_inv_freq(config, weights.rope_freq_factors).to(self.device)
        freqs = torch.outer(torch.arange(max_positions, device=self.device, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self.dtype)  # [max_positions, head_dim]
        self._sin = emb.sin().to(self.dtype)

    def linear(self, x: torch.Tensor, w: torch.Tensor | Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T (+ bias): F.linear, or the FP8 GEMM with the ops' activation quantizer."""
        return linear(x, w, bias, self._quantize_rows)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        """Hidden states after the final norm for every new token: [T, hidden].

        The residual stream is carried separately so that each "add the block's output, then
        normalise" is one fused op (in place on the residual with the Triton ops)."""
        c = self.config
        ops, lin = self.ops, self.linear
        T = input_ids.shape[0]
        nh, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = nh * hd, nkv * hd
        eps = c.rms_norm_eps
        tp = self.tp
        h = tp.embed(self.w.embed, input_ids) if tp else self.w.embed.index_select(0, input_ids)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.w.layers):
            if residual is None:
                residual = h
                x = ops.rms_norm(h, layer.attn_norm, eps)
            else:
                x, residual = ops.add_rms_norm(h, residual, layer.attn_norm, eps)
            qkv = lin(x, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q, k = ops.rotary(q.view(T, nh, hd), k.view(T, nkv, hd), self._cos, self._sin, positions)
            o = self.attn(q, k, v.view(T, nkv, hd), cache.k[i], cache.v[i], meta, cache.k_scale[i], cache.v_scale[i])
            h = lin(o.reshape(T, q_size), layer.o)
            if tp:
                tp.all_reduce(h)  # each rank's heads gave a partial sum of the projection
            x, residual = ops.add_rms_norm(h, residual, layer.ffn_norm, eps)
            h = lin(ops.silu_and_mul(lin(x, layer.gate_up)), layer.down)
            if tp:
                tp.all_reduce(h)  # and each rank's MLP channels
        if residual is None:  # a model with no layers
            return ops.rms_norm(h, self.w.final_norm, eps)
        return ops.add_rms_norm(h, residual, self.w.final_norm, eps)[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the given hidden rows: [N, vocab] (gathered from every rank's
        vocabulary slice under tensor parallelism)."""
        logits = F.linear(hidden, self.w.lm_head)
        if self.tp:
            logits = self.tp.gather_vocab(logits)
        return logits.float()

    @torch.inference_mode()
    def dense_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits for every position of one sequence with plain causal attention and no cache.
        A reference for tests: it shares no code with the paged path beyond the layer math
        (FP8 weights go through fp8.linear with the plain-torch activation quantizer). One rank
        only: it has no collectives."""
        assert self.tp is None, "dense_logits is a single-rank reference"
        c = self.config
        ids = torch.tensor(token_ids, device=self.device)
        T = ids.shape[0]
        nh, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        pos = torch.arange(T, device=self.device)
        cos, sin = self._cos[pos][:, None, :], self._sin[pos][:, None, :]
        h = self.w.embed[ids]
        for layer in self.w.layers:
            x = rms_norm(h, layer.attn_norm, c.rms_norm_eps)
            q, k, v = linear(x, layer.qkv, layer.qkv_bias).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
            h = h + linear(o.transpose(0, 1).reshape(T, nh * hd), layer.o)
            x = rms_norm(h, layer.ffn_norm, c.rms_norm_eps)
            gate, up = linear(x, layer.gate_up).chunk(2, dim=-1)
            h = h + linear(F.silu(gate) * up, layer.down)
        return self.logits(rms_norm(h, self.w.final_norm, c.rms_norm_eps))
