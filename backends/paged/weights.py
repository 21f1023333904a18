"""Model tensors from GGUF (dequantized with the `gguf` package), HF safetensors, or random.

Every source is first turned into a dict keyed by HF parameter names, then packed into
`ModelWeights` (q/k/v and gate/up fused so each layer makes two big matmuls instead of five).
Under tensor parallelism each loader takes a `select` hook (shard.selector) that cuts every
tensor to the rank's slice as it is read, so a rank never holds the whole model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.paged.config import ModelConfig
from backends.paged.fp8 import Fp8Weight

# (HF name, whole tensor) -> the tensor to keep (a rank's slice); None keeps every tensor whole.
Select = Callable[[str, torch.Tensor], torch.Tensor] | None


@dataclass
class LayerWeights:
    """One decoder layer. The four linear weights are plain tensors in the compute dtype, or
    Fp8Weights with `quantization: fp8` (fp8.quantize_model); model.py's `linear` takes both."""

    attn_norm: torch.Tensor  # [H]
    qkv: torch.Tensor | Fp8Weight  # [(nh + 2*nkv) * hd, H]
    qkv_bias: torch.Tensor | None  # [(nh + 2*nkv) * hd] (Qwen2)
    o: torch.Tensor | Fp8Weight  # [H, nh * hd]
    ffn_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor | Fp8Weight  # [2 * I, H]
    down: torch.Tensor | Fp8Weight  # [H, I]


@dataclass
class ModelWeights:
    """A model's (or, under tensor parallelism, one rank's) tensors: a rank holds its rows of
    embed and lm_head ([V / N padded, H]) and its heads' and channels' rows or columns of each
    layer's linear weights (parallel.py)."""

    embed: torch.Tensor  # [V, H]
    lm_head: torch.Tensor  # [V, H]; the same storage as embed when tied
    final_norm: torch.Tensor  # [H]
    layers: list[LayerWeights]
    rope_freq_factors: torch.Tensor | None = None  # Llama 3 GGUFs carry RoPE scaling this way

    def nbytes(self) -> int:
        """Bytes held by the weights (tied embeddings counted once; an FP8 weight as its
        one-byte values plus its float32 scales)."""
        seen: set[int] = set()
        total = 0
        tensors = [self.embed, self.lm_head, self.final_norm]
        for layer in self.layers:
            for t in vars(layer).values():
                if isinstance(t, Fp8Weight):
                    tensors += t.tensors()
                elif t is not None:
                    tensors.append(t)
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


# GGUF tensor names -> HF names ("{i}" is the layer index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.*)$")


def _gguf_name_to_hf(name: str) -> str | None:
    m = _BLK.match(name)
    if m:
        target = _GGUF_TO_HF.get(f"blk.{{i}}.{m.group(2)}")
        return target.format(i=m.group(1)) if target else None
    return _GGUF_TO_HF.get(name)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time Q/K row permutation.

    HF Llama checkpoints rotate the two halves of each head (rotate_half); llama.cpp's converter
    permutes the rows of attn_q/attn_k so its interleaved-pair RoPE gives the same result. We run
    HF-style RoPE, so we put the rows back: the inverse of
    `w.reshape(n_heads, 2, hd // 2, ...).swapaxes(1, 2)`.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def load_gguf_tensors(reader: Any, config: ModelConfig, select: Select = None) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file, dequantized to float32, under HF names (each cut by `select`)."""
    from gguf import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = _gguf_name_to_hf(t.name)
        if hf is None:
            continue
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(reversed([int(x) for x in t.shape]))  # GGML lists dims fastest first
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if not arr.flags.writeable:  # F32 tensors come straight from the read-only memmap
            arr = arr.copy()
        tensor = torch.from_numpy(arr)
        # Only the llama architecture is permuted by the converter (Qwen2 uses NEOX-style RoPE).
        if config.arch == "llama":
            if hf.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = unpermute_rope_rows(tensor, config.num_heads)
            elif hf.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = unpermute_rope_rows(tensor, config.num_kv_heads)
        out[hf] = tensor if select is None else select(hf, tensor)
    return out


def load_safetensors(model_dir: Path, select: Select = None) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory's *.safetensors files (each cut by `select`, one
    tensor read at a time)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    for f in files:
        if select is None:
            out.update(load_file(str(f)))
            continue
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                out[name] = select(name, st.get_tensor(name))
    return out


def random_tensors(
    config: ModelConfig, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, select: Select = None
) -> dict[str, torch.Tensor]:
    """Random weights in HF naming, scaled so activations stay O(1) through the layers.

    On CUDA they are drawn on the device in the compute dtype (an 8B model in a second instead
    of minutes of CPU time); the values depend on the device, the seed fixes them per device.
    With `select` each tensor is drawn whole (so a rank's slice holds the values the whole
    model has) and cut at once."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, hd = config.hidden_size, config.intermediate_size, config.head_dim

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(std)

    def norm() -> torch.Tensor:
        return 1.0 + rnd(H, std=0.1)

    out = _Selected(select)
    out["model.embed_tokens.weight"] = rnd(config.vocab_size, H, std=1.0)
    out["model.norm.weight"] = norm()
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = rnd(config.vocab_size, H, std=H**-0.5)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm()
        out[p + "post_attention_layernorm.weight"] = norm()
        out[p + "self_attn.q_proj.weight"] = rnd(config.num_heads * hd, H, std=H**-0.5)
        out[p + "self_attn.k_proj.weight"] = rnd(config.num_kv_heads * hd, H, std=H**-0.5)
        out[p + "self_attn.v_proj.weight"] = rnd(config.num_kv_heads * hd, H, std=H**-0.5)
        out[p + "self_attn.o_proj.weight"] = rnd(H, config.num_heads * hd, std=(config.num_heads * hd) ** -0.5)
        if config.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = rnd(config.num_heads * hd)
            out[p + "self_attn.k_proj.bias"] = rnd(config.num_kv_heads * hd)
            out[p + "self_attn.v_proj.bias"] = rnd(config.num_kv_heads * hd)
        out[p + "mlp.gate_proj.weight"] = rnd(I, H, std=H**-0.5)
        out[p + "mlp.up_proj.weight"] = rnd(I, H, std=H**-0.5)
        out[p + "mlp.down_proj.weight"] = rnd(H, I, std=I**-0.5)
    return dict(out)


class _Selected(dict[str, torch.Tensor]):
    """A dict that keeps what `select` makes of each tensor stored in it."""

    def __init__(self, select: Select) -> None:
        super().__init__()
        self._select = select

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        super().__setitem__(name, t if self._select is None else self._select(name, t))


def pack_weights(tensors: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """HF-named tensors -> fused `ModelWeights` in the compute dtype on the device."""

    def get(name: str) -> torch.Tensor:
        try:
            return tensors[name].to(device=device, dtype=dtype)
        except KeyError:
            raise ValueError(f"model is missing tensor {name!r}") from None

    embed = get("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings or "lm_head.weight" not in tensors else get("lm_head.weight")
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        bias = None
        if config.qkv_bias:
            bias = torch.cat([get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")])
        layers.append(
            LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                qkv=torch.cat([get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")]).contiguous(),
                qkv_bias=bias,
                o=get(a + "o_proj.weight"),
                ffn_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]).contiguous(),
                down=get(p + "mlp.down_proj.weight"),
            )
        )
        # Free the unfused copies as we go so peak memory stays near one model.
        for key in [k for k in tensors if k.startswith(p)]:
            del tensors[key]
    freqs = tensors.get("rope_freqs")
    return ModelWeights(
        embed=embed,
        lm_head=lm_head,
        final_norm=get("model.norm.weight"),
        layers=layers,
        rope_freq_factors=None if freqs is None else freqs.float().to(device),
    )
