"""The decode step's floor on one GPU: per op, max(bytes / bandwidth, FLOPs / peak), summed.

A decode step of batch B over C context tokens (summed over its sequences) runs, per op:

    qkv, o, gate_up, down   every layer's weight read once, 2 x params x B FLOPs (the
                            activations read and written too)
    attention               every context token's K and V read once (all layers);
                            QK^T and PV: 4 x heads x head_dim x C FLOPs per layer
    lm_head                 the [V, H] matrix read once, 2 x V x H x B FLOPs
    embed                   B rows gathered (not the whole table)

The bytes-only floor is sum(bytes) / bandwidth; the bytes-and-FLOPs floor sums each op's
max(bytes / bandwidth, FLOPs / peak): at batch 256 an 8B model's GEMMs are compute-bound on a
Hopper GPU, so the bytes alone understate the step. FP8 weights count one byte a value (plus
their scales) at the FP8 peak. Under tensor parallelism the weights and shapes are one rank's.

Bandwidth and peaks are measured on the device at start (`measure_limits`): a large
device-to-device copy (bytes read plus written), a large matmul in the compute dtype, and
`torch._scaled_mm` with the engine's row-wise scales for FP8. The data sheet's numbers
(`NOMINAL`) are printed beside them, and stand in for any that cannot be measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Data-sheet numbers, dense (no sparsity): (HBM bytes/s, bf16 FLOP/s, fp8 FLOP/s or None),
# matched by substring of torch.cuda.get_device_name(), the first match winning.
NOMINAL: list[tuple[str, tuple[float, float, float | None]]] = [
    ("H200", (4.8e12, 989e12, 1979e12)),
    ("H100 NVL", (3.9e12, 835e12, 1671e12)),
    ("H100 PCIe", (2.0e12, 756e12, 1513e12)),
    ("H100", (3.35e12, 989e12, 1979e12)),  # SXM
    ("A100", (2.039e12, 312e12, None)),
    ("L40S", (0.864e12, 362e12, 733e12)),
]


@dataclass
class DeviceLimits:
    """What one GPU can do, as used for the floors, with where each number came from."""

    bandwidth: float  # bytes/s (copy: read + written)
    matmul_flops: float  # FLOP/s in the compute dtype
    fp8_flops: float | None = None  # FLOP/s of the FP8 GEMM; None: not measured or not asked for
    source: dict[str, str] = field(default_factory=dict)  # number -> "measured" | "nominal"
    nominal: dict[str, float | None] = field(default_factory=dict)  # the data sheet's, for comparison

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def nominal_limits(device_name: str) -> tuple[float, float, float | None] | None:
    """The data sheet's (bandwidth, bf16 peak, fp8 peak) for a device name, or None if unknown."""
    for key, limits in NOMINAL:
        if key.lower() in device_name.lower():
            return limits
    return None


def _median_ms(torch: Any, fn: Any, iters: int = 10, warmup: int = 3) -> float:
    """Median CUDA-event time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def copy_bandwidth(torch: Any, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _median_ms(torch, lambda: dst.copy_(src))
    src = dst = None  # freed before empty_cache (the timed lambda holds them)
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3)


def matmul_peak(torch: Any, dtype: Any, n: int = 8192) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (cuBLAS at its best shape)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = _median_ms(torch, lambda: a @ b)
    a = b = None
    torch.cuda.empty_cache()
    return 2 * n**3 / (ms / 1e3)


def fp8_matmul_peak(torch: Any, n: int = 8192) -> float:
    """FLOP/s of the engine's FP8 GEMM (fp8.fp8_linear's call: e4m3 operands, row-wise
    float32 scales, bf16 out) at n x n x n."""
    from backends.paged.fp8 import FP8_DTYPE

    a = torch.randn(n, n, device="cuda").to(FP8_DTYPE)
    w = torch.randn(n, n, device="cuda").to(FP8_DTYPE)  # [N, K]; passed transposed, as the engine does
    sa = torch.ones(n, 1, device="cuda", dtype=torch.float32)
    sb = torch.ones(1, n, device="cuda", dtype=torch.float32)
    ms = _median_ms(torch, lambda: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    a = w = None
    torch.cuda.empty_cache()
    return 2 * n**3 / (ms / 1e3)


def measure_limits(torch: Any, dtype: Any, *, fp8: bool) -> DeviceLimits:
    """Bandwidth and peaks measured on the current CUDA device (FP8 only when asked), each
    falling back to the data sheet where its measurement fails."""
    nominal = nominal_limits(torch.cuda.get_device_name()) or (0.0, 0.0, None)
    names = ("bandwidth", "matmul_flops", "fp8_flops")
    probes = (lambda: copy_bandwidth(torch), lambda: matmul_peak(torch, dtype), lambda: fp8_matmul_peak(torch) if fp8 else None)
    values: dict[str, float | None] = {}
    source: dict[str, str] = {}
    for name, probe, fallback in zip(names, probes, nominal):
        try:
            values[name] = probe()
            source[name] = "measured"
        except Exception as exc:  # a failed probe must not lose the run: the data sheet stands in
            values[name] = fallback
            source[name] = f"nominal ({type(exc).__name__}: {exc})"[:200]
        if values[name] is None:
            source.pop(name)
    return DeviceLimits(
        bandwidth=float(values["bandwidth"] or 0.0),
        matmul_flops=float(values["matmul_flops"] or 0.0),
        fp8_flops=values["fp8_flops"],
        source=source,
        nominal=dict(zip(names, nominal)),
    )


@dataclass
class OpCost:
    """One op of a decode step: the bytes it must move and the FLOPs it must do, and the peak
    (FLOP/s) its math runs at."""

    name: str
    bytes: float
    flops: float
    peak: float

    def bytes_s(self, bandwidth: float) -> float:
        return self.bytes / bandwidth if bandwidth else 0.0

    def flops_s(self) -> float:
        return self.flops / self.peak if self.peak else 0.0

    def floor_s(self, bandwidth: float) -> float:
        """max(bytes / bandwidth, FLOPs / peak)."""
        return max(self.bytes_s(bandwidth), self.flops_s())


def _tensor_bytes(w: Any) -> int:
    """Bytes of a weight: a tensor, or an Fp8Weight (its values and scales)."""
    parts = w.tensors() if hasattr(w, "tensors") else (w,)
    return sum(t.numel() * t.element_size() for t in parts)


def decode_ops(weights: Any, config: Any, kv_token_bytes: float, batch: float, context_tokens: float, limits: DeviceLimits, act_bytes: int = 2) -> list[OpCost]:
    """The ops of one decode step (see the module docstring) for `weights` (ModelWeights, one
    rank's) of `config` (that rank's shape), at `batch` sequences over `context_tokens`.
    `act_bytes`: bytes of one activation value (the compute dtype's)."""
    fp8_peak = limits.fp8_flops or limits.matmul_flops
    ops: dict[str, OpCost] = {}

    def add(name: str, nbytes: float, flops: float, peak: float) -> None:
        op = ops.setdefault(name, OpCost(name, 0.0, 0.0, peak))
        op.bytes += nbytes
        op.flops += flops

    for layer in weights.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            w = getattr(layer, name)
            n_out, k_in = (int(d) for d in w.shape)
            is_fp8 = hasattr(w, "qweight")
            # Weight once, the batch's input read and output written.
            add(name, _tensor_bytes(w) + batch * (k_in + n_out) * act_bytes, 2.0 * n_out * k_in * batch, fp8_peak if is_fp8 else limits.matmul_flops)
    vocab, hidden = (int(d) for d in weights.lm_head.shape)
    add("lm_head", _tensor_bytes(weights.lm_head) + batch * hidden * act_bytes + batch * vocab * 4, 2.0 * vocab * hidden * batch, limits.matmul_flops)
    add("embed", batch * hidden * weights.embed.element_size() * 2, 0.0, limits.matmul_flops)  # rows gathered, written
    q_width = config.num_heads * config.head_dim
    add("attention", context_tokens * kv_token_bytes + batch * 2 * q_width * act_bytes * config.num_layers,
        4.0 * q_width * context_tokens * config.num_layers, limits.matmul_flops)  # fmt: skip
    return list(ops.values())


@dataclass
class StepFloor:
    """A decode step's two floors in seconds."""

    bytes_s: float  # sum(bytes) / bandwidth
    op_s: float  # sum over ops of max(bytes / bandwidth, FLOPs / peak)


def step_floor(ops: list[OpCost], bandwidth: float) -> StepFloor:
    """Both floors of a step made of `ops`."""
    return StepFloor(sum(op.bytes_s(bandwidth) for op in ops), sum(op.floor_s(bandwidth) for op in ops))


def ops_table(ops: list[OpCost], bandwidth: float) -> list[dict[str, Any]]:
    """Each op's bytes, FLOPs, both times and which one bounds it (for the JSON report)."""
    rows = []
    for op in ops:
        b, f = op.bytes_s(bandwidth), op.flops_s()
        rows.append({"op": op.name, "bytes": op.bytes, "flops": op.flops, "bytes_ms": b * 1e3, "flops_ms": f * 1e3,
                     "floor_ms": max(b, f) * 1e3, "bound": "FLOPs" if f > b else "bytes"})  # fmt: skip
    return rows
