"""Model shape: from GGUF metadata, an HF config.json, or a named dummy shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.embeddings import Pooling, gguf_pooling


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about a Llama-family model's shape."""

    arch: str  # "llama" (Llama 2/3, SmolLM2, Mistral) or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict ({"rope_type": "llama3"|"linear", "factor": ..., ...}) or None.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # The pooling an embedding model's GGUF states (`{arch}.pooling_type`); None: it states none.
    pooling: Pooling | None = None


# Named random-weight shapes for benchmarks and tests. "tiny" is for unit tests: a vocab that
# covers the byte tokenizer (3 specials + 256 bytes) plus some headroom.
DUMMY_SHAPES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        arch="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
    ),
    "smollm2-135m": ModelConfig(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama3-1b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama3-8b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
    ),
    # 70.6e9 parameters: 141 GB in bf16, so more than one GPU (tensor_parallel_size 2 on H200s).
    "llama3-70b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
    ),
}


def dummy_config(shape: str) -> ModelConfig:
    """The named dummy shape (`dummy:<shape>`)."""
    try:
        return DUMMY_SHAPES[shape]
    except KeyError:
        raise ValueError(f"unknown dummy shape {shape!r}; known: {', '.join(DUMMY_SHAPES)}") from None


def _field(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    """A scalar/str/array metadata value from a GGUFReader's fields."""
    f = fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_gguf(reader: Any) -> ModelConfig:
    """Model shape from a `gguf.GGUFReader`'s metadata (llama / qwen2 architectures)."""
    fields = reader.fields
    arch = _field(fields, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (paged supports llama, qwen2)")
    p = arch
    hidden = int(_field(fields, f"{p}.embedding_length"))
    heads = int(_field(fields, f"{p}.attention.head_count"))
    kv_heads = int(_field(fields, f"{p}.attention.head_count_kv", heads))
    head_dim = int(_field(fields, f"{p}.attention.key_length", hidden // heads))
    tokens = _field(fields, "tokenizer.ggml.tokens")
    vocab = int(_field(fields, f"{p}.vocab_size", len(tokens) if tokens is not None else 0))
    scaling = None
    stype = _field(fields, f"{p}.rope.scaling.type")
    factor = _field(fields, f"{p}.rope.scaling.factor")
    if stype == "linear" and factor:
        scaling = {"rope_type": "linear", "factor": float(factor)}
    # Llama 3.x stores its frequency factors as the `rope_freqs.weight` tensor instead;
    # weights.py picks that up.
    tensor_names = {t.name for t in reader.tensors}
    eos = _field(fields, "tokenizer.ggml.eos_token_id")
    eot = _field(fields, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
    bos = _field(fields, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch="qwen2" if arch == "qwen2" else "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(fields, f"{p}.feed_forward_length")),
        num_layers=int(_field(fields, f"{p}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(fields, f"{p}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(fields, f"{p}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(fields, f"{p}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        pooling=gguf_pooling(_field(fields, f"{p}.pooling_type")),
    )


def config_from_hf(model_dir: Path) -> ModelConfig:
    """Model shape from an HF model directory's config.json (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported model_type {model_type!r} (paged supports llama, mistral, qwen2)")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    scaling = cfg.get("rope_scaling")
    if scaling and "rope_type" not in scaling and "type" in scaling:
        scaling = {**scaling, "rope_type": scaling["type"]}
    return ModelConfig(
        arch="qwen2" if model_type == "qwen2" else "llama",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(int(x) for x in eos_ids),
    )
