"""Where FP8's logit error comes from (issue 16's accuracy target), on the CPU.

Not a test: a program. Real SmolLM2-135M-Instruct (the GGUF from the model store, loaded by
transformers in float32) reads a few chat prompts; every decoder linear layer is then run
with its weight and/or its input rounded through float8 e4m3 (quantize, dequantize, multiply
in float32), with the engine's scheme (`backends.paged.fp8`: one scale per weight row, one per
token) and variants of it, and each variant's logits are compared with float32's at every
position: relative L2 over all positions, and top-1 agreement. bf16 is the same-run peer.

    .venv/bin/python -m gateway.bench.fp8_error [--json out.json]

The rounding is what the FP8 GEMM computes (it multiplies the rounded values exactly and
accumulates in float32), so this measures the format and its scales, not a kernel.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from backends.paged.fp8 import FP8_DTYPE, quantize_rows, quantize_weight

PROMPTS = [
    "The CPU is the part of a computer that",
    "Write a haiku about the ocean and the moon.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Photosynthesis converts light energy into chemical energy. In plants, this happens in",
]

Rounding = Callable[[torch.Tensor], torch.Tensor]


def per_row(x: torch.Tensor) -> torch.Tensor:
    """The engine's activation rounding: one scale per token (fp8.quantize_rows)."""
    q, s = quantize_rows(x.reshape(-1, x.shape[-1]))
    return (q.float() * s).reshape(x.shape)


def weight_rows(w: torch.Tensor) -> torch.Tensor:
    """The engine's weight rounding: one scale per output channel (fp8.quantize_weight)."""
    return quantize_weight(w).dequantize()


def groups(n: int, dtype: torch.dtype = FP8_DTYPE) -> Rounding:
    """One scale per `n` consecutive values of a row (as DeepSeek-V3's 1x128 tiles; SmolLM2's 576-wide rows take 64)."""
    top = torch.finfo(dtype).max

    def rounding(x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(*x.shape[:-1], x.shape[-1] // n, n)
        s = y.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
        return ((y / s).clamp(-top, top).to(dtype).float() * s).reshape(x.shape)

    return rounding


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / s).clamp(-127, 127) * s


VARIANTS: dict[str, tuple[Rounding | None, Rounding | None]] = {
    "fp8 weights and activations (the engine's scheme)": (weight_rows, per_row),
    "fp8 weights only": (weight_rows, None),
    "fp8 activations only": (None, per_row),
    "fp8, a scale per 64 values (weights and activations)": (groups(64), groups(64)),
    "int8 weights and activations, per row (for comparison)": (int8_rows, int8_rows),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a model-store name or a GGUF path")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.models import resolve_model

    path = Path(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) for t in PROMPTS]
    ids = [tok(text, return_tensors="pt").input_ids for text in chats]
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    weights = [m.weight.data.clone() for m in linears]

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(i).logits[0].float() for i in ids])

    def use(weight_round: Rounding | None, act_round: Rounding | None) -> None:
        for m, w in zip(linears, weights, strict=True):
            m.weight.data = weight_round(w) if weight_round else w.clone()
            m.forward = (lambda m: lambda x: F.linear(act_round(x) if act_round else x, m.weight, m.bias))(m)  # type: ignore[method-assign]

    use(None, None)
    ref = logits()
    rows = {}
    for label, (w_round, a_round) in VARIANTS.items():
        use(w_round, a_round)
        rows[label] = _diff(logits(), ref)
    use(None, None)
    model.to(torch.bfloat16)
    rows["bf16 (the engine's unquantized dtype)"] = _diff(logits(), ref)
    print(f"{'against float32, ' + str(ref.shape[0]) + ' positions':<58} {'rel L2':>7} {'top-1':>7}")
    for label, row in rows.items():
        print(f"{label:<58} {row['rel_l2']:>7.1%} {row['top1']:>7.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"positions": ref.shape[0], "rows": rows}, indent=1))


def _diff(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"rel_l2": float((got - ref).norm() / ref.norm()), "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


if __name__ == "__main__":
    main()
