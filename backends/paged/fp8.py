"""FP8 (e4m3) linear layers: the engine's `quantization: fp8`.

The scheme is W8A8 with row-wise scales, the one Hopper's FP8 tensor cores run at twice bf16's
rate and that halves the bytes a decode step reads for its weights:

- weights: each linear layer's [N, K] matrix is quantized once, at load, to float8_e4m3fn with
  one float32 scale per output channel (row): scale = amax(|row|) / 448, e4m3's largest finite
  value, so every row uses the whole range (`quantize_weight`);
- activations: each GEMM's input [T, K] is quantized right before the GEMM with one scale per
  token (row), computed on the device from the row's own amax (`quantize_rows`): no calibration
  and no host sync, so the path can be captured in a CUDA graph;
- the GEMM: `torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=[T, 1], scale_b=[1, N])`, which
  multiplies in FP8, accumulates in float32 and applies both scales (and the bias) in its
  epilogue, writing the activation dtype (bf16).

`linear(x, w, bias)` is the one call the decoder makes: a plain tensor goes through F.linear,
an `Fp8Weight` through the FP8 GEMM, so model.py reads the same with or without quantization.
The embeddings and the lm_head stay in the compute dtype: the embedding is a gather, not a
GEMM, and the lm_head (often tied to it) decides every sampled token, where FP8's error costs
the most agreement for a few percent of the weights' bytes.

cuBLAS's FP8 GEMM wants K and N multiples of 16 and mat2 column-major; the [N, K] row-major
weight's transpose is that view. A layer whose shape does not fit stays in the compute dtype
(`can_quantize`). The functions run on the CPU too (torch has float8 tensors and a CPU
`_scaled_mm`), which is what the unit tests use; the engine itself refuses FP8 on the CPU
(`check_fp8_support`), which keeps its bf16 / fp32 path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from backends.paged.weights import ModelWeights

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A row of zeros would get a zero scale (and 0 / 0 = NaN when quantizing): its amax is
# clamped to this first, which quantizes it to zeros with a tiny, harmless scale.
MIN_AMAX = 1e-12
# The layers `quantization: fp8` converts (LayerWeights' fields); embed and lm_head stay.
LINEAR_FIELDS = ("qkv", "o", "gate_up", "down")
# Compute capability of the first GPUs with FP8 tensor cores (Ada is 8.9, Hopper 9.0).
MIN_CAPABILITY = (8, 9)

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Fp8Weight:
    """A linear layer's weight in FP8: `qweight` [N, K] float8_e4m3fn, row-major (its `.t()`
    is the column-major [K, N] operand `_scaled_mm` wants), and `scale` [1, N] float32, one
    per output channel, so that weight ~= qweight * scale.T."""

    qweight: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """[N, K], as the unquantized weight's."""
        return self.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors holding it (ModelWeights.nbytes counts them)."""
        return self.qweight, self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight it stands for, [N, K] in `dtype` (references, the transformers peer)."""
        return (self.qweight.float() * self.scale.t()).to(dtype)


def can_quantize(w: torch.Tensor) -> bool:
    """Whether `_scaled_mm` takes this [N, K] weight: both dims multiples of 16 (cuBLAS)."""
    return w.dim() == 2 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0


def _scales(amax: torch.Tensor) -> torch.Tensor:
    """float32 scales mapping each row's amax onto FP8_MAX."""
    return amax.float().clamp(min=MIN_AMAX) / FP8_MAX


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in float32, clamped to e4m3's finite range (e4m3fn has no infinity, and what
    a cast does with an overflow, saturate or NaN, differs between builds and devices),
    rounded to the nearest e4m3 value."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(w: torch.Tensor, rows_per_chunk: int = 4096) -> Fp8Weight:
    """Per-output-channel FP8 quantization of a [N, K] weight.

    Done in chunks of rows, so that the float32 temporaries stay small next to an 8B model's
    largest matrix (gate_up: 28672 x 4096)."""
    if not can_quantize(w):
        raise ValueError(f"an FP8 weight needs both dims to be multiples of 16, got {tuple(w.shape)}")
    n = w.shape[0]
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=w.device)
    for start in range(0, n, rows_per_chunk):
        rows = w[start : start + rows_per_chunk]
        s = _scales(rows.abs().amax(dim=1, keepdim=True))
        scale[start : start + rows_per_chunk] = s
        q[start : start + rows_per_chunk] = _to_fp8(rows, s)
    # [1, N]: the shape _scaled_mm's row-wise scaling takes for mat2 (its transpose, [N, 1],
    # is contiguous either way).
    return Fp8Weight(q, scale.t().contiguous())


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of activations x [T, K]: (x_fp8 [T, K] contiguous,
    scale [T, 1] float32), x ~= x_fp8 * scale. Device ops only (no sync): CUDA-graph safe.

    The plain-torch version: the CPU, `kernels: torch` on CUDA, and the reference for the
    fused Triton kernel (triton_ops.quantize_rows)."""
    scale = _scales(x.abs().amax(dim=-1, keepdim=True))
    return _to_fp8(x, scale), scale


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None, quantize: Quantizer = quantize_rows) -> torch.Tensor:
    """x @ W.T (+ bias) with x quantized per token and W per channel; the result in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()  # the FP8 GEMM reads mat1 row-major
    xq, xs = quantize(x2)
    # _scaled_mm adds a bias only to a 16-bit output (cuBLAS's epilogue); a float32 output (CPU
    # tests) gets it added after.
    fused_bias = bias if bias is not None and x.dtype in (torch.bfloat16, torch.float16) else None
    out = torch._scaled_mm(xq, w.qweight.t(), scale_a=xs, scale_b=w.scale, bias=fused_bias, out_dtype=x.dtype)
    if bias is not None and fused_bias is None:
        out = out + bias
    return out.reshape(*lead, w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor | Fp8Weight, bias: torch.Tensor | None = None, quantize: Quantizer = quantize_rows) -> torch.Tensor:
    """The decoder's one linear layer: F.linear for a plain weight, the FP8 GEMM for an
    Fp8Weight (its activations quantized by `quantize`)."""
    if isinstance(w, Fp8Weight):
        return fp8_linear(x, w, bias, quantize)
    return F.linear(x, w, bias)


def dense(w: torch.Tensor | Fp8Weight, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a plain tensor in `dtype` (an Fp8Weight dequantized)."""
    return w.dequantize(dtype) if isinstance(w, Fp8Weight) else w


def quantize_model(weights: ModelWeights) -> ModelWeights:
    """Replace every layer's linear weights with Fp8Weights, in place, one weight at a time (so
    the peak is the unquantized model plus one FP8 matrix and its temporaries); embed and
    lm_head stay as they are. A weight whose shape `_scaled_mm` cannot take stays unquantized,
    logged.

    On CUDA the allocator's cache is emptied before each weight: the 16-bit weight just
    replaced, and the temporaries, go back to the driver at once, so that no FP8 copy is placed
    inside their segments (which would keep those segments, mostly empty, from ever going back,
    and the KV pool, sized from what the driver reports free, from getting that memory)."""
    cuda = weights.embed.is_cuda
    kept = []
    for i, layer in enumerate(weights.layers):
        for name in LINEAR_FIELDS:
            w = getattr(layer, name)
            if isinstance(w, Fp8Weight):
                continue
            if not can_quantize(w):
                kept.append(f"layers.{i}.{name} {tuple(w.shape)}")
                continue
            if cuda:
                torch.cuda.empty_cache()
            setattr(layer, name, quantize_weight(w))
            del w  # the unquantized copy goes now, not after the last layer
    if cuda:
        torch.cuda.empty_cache()
        log.info(
            "FP8 weights: %.2f GiB allocated, %.2f GiB held by the allocator beyond that",
            torch.cuda.memory_allocated() / 2**30, (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2**30,
        )  # fmt: skip
    if kept:
        log.warning("FP8: %d weights not multiples of 16 stay unquantized: %s", len(kept), ", ".join(kept[:4]))
    return weights


def check_fp8_support(device: torch.device) -> None:
    """Raise ValueError, naming the option, unless `device` can run the FP8 path: a CUDA GPU
    of compute capability 8.9 or newer on which this torch's row-wise `_scaled_mm` runs (one
    tiny GEMM is tried, so that an unsupported GPU or build fails here, at start, and not at
    the first request)."""
    device = torch.device(device)
    prefix = "paged backend option quantization: fp8"
    if device.type != "cuda":
        raise ValueError(
            f"{prefix} needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100); "
            f"the engine's device is {device.type}, which keeps the bf16/fp32 path: leave quantization unset there"
        )
    cap = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if cap < MIN_CAPABILITY:
        raise ValueError(
            f"{prefix} needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
            f"{name} has {cap[0]}.{cap[1]}: leave quantization unset on it"
        )
    try:
        _probe_fp8_gemm(device)
    except RuntimeError as exc:
        raise ValueError(f"{prefix}: torch {torch.__version__} cannot run row-wise FP8 GEMMs on {name}: {exc}") from None


def _probe_fp8_gemm(device: torch.device) -> None:
    """One 1 x 128 x 128 FP8 GEMM (one token, as a single sequence's decode step) on the
    device, waited for; raises what torch raises."""
    w = quantize_weight(torch.ones((128, 128), dtype=torch.bfloat16, device=device))
    fp8_linear(torch.ones((1, 128), dtype=torch.bfloat16, device=device), w)
    torch.cuda.synchronize(device)
