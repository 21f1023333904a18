"""The same model in transformers: an HF LlamaForCausalLM holding the engine's weights.

For correctness checks and for the benchmark's peer (transformers' continuous batching on the
same random weights). transformers is imported only inside these functions: the engine
itself never needs it.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.paged.config import ModelConfig
from backends.paged.fp8 import dense
from backends.paged.weights import ModelWeights


def hf_llama_config(config: ModelConfig, dtype: torch.dtype) -> Any:
    """A transformers LlamaConfig (Qwen2Config for qkv-bias models) of the same shape."""
    from transformers import LlamaConfig, Qwen2Config

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        kind = config.rope_scaling.get("rope_type") or config.rope_scaling.get("type")
        rope = {**{k: v for k, v in config.rope_scaling.items() if k != "type"}, "rope_type": kind, "rope_theta": config.rope_theta}
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope,
        bos_token_id=config.bos_token_id,
        eos_token_id=None,  # benchmarks and checks run to their token count
        pad_token_id=0,
        dtype=dtype,
    )
    if config.qkv_bias:
        return Qwen2Config(**common)
    return LlamaConfig(**common, attention_bias=False)


def hf_state_dict(config: ModelConfig, weights: ModelWeights) -> dict[str, torch.Tensor]:
    """HF parameter names -> views of the engine's (fused) tensors; FP8 weights dequantized
    to the compute dtype (transformers runs them as the bf16 model they approximate)."""
    nh, nkv, hd, inter = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    q, kv = nh * hd, nkv * hd
    dtype = weights.embed.dtype
    sd = {
        "model.embed_tokens.weight": weights.embed,
        "model.norm.weight": weights.final_norm,
        "lm_head.weight": weights.lm_head,
    }
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        qkv, o, gate_up, down = (dense(w, dtype) for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
        sd[p + "input_layernorm.weight"] = layer.attn_norm
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm
        sd[p + "self_attn.q_proj.weight"] = qkv[:q]
        sd[p + "self_attn.k_proj.weight"] = qkv[q : q + kv]
        sd[p + "self_attn.v_proj.weight"] = qkv[q + kv :]
        if layer.qkv_bias is not None:
            sd[p + "self_attn.q_proj.bias"] = layer.qkv_bias[:q]
            sd[p + "self_attn.k_proj.bias"] = layer.qkv_bias[q : q + kv]
            sd[p + "self_attn.v_proj.bias"] = layer.qkv_bias[q + kv :]
        sd[p + "self_attn.o_proj.weight"] = o
        sd[p + "mlp.gate_proj.weight"] = gate_up[:inter]
        sd[p + "mlp.up_proj.weight"] = gate_up[inter:]
        sd[p + "mlp.down_proj.weight"] = down
    return sd


def build_hf_model(config: ModelConfig, weights: ModelWeights, attn_implementation: str = "sdpa") -> Any:
    """An HF causal LM on the weights' device and dtype, holding a copy of the weights."""
    from transformers import AutoModelForCausalLM

    dtype = weights.embed.dtype
    device = weights.embed.device
    hf_config = hf_llama_config(config, dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the compute dtype (an 8B model twice in fp32 would not fit)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)
    finally:
        torch.set_default_dtype(prev)
    sd = hf_state_dict(config, weights)
    # Plain tensors, not inference-mode ones: transformers' continuous batching updates its
    # buffers in place from a worker thread that is not in inference mode.
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the HF model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()
