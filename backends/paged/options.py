"""The `options:` of a `kind: paged` backend, torch-free so that the serving process can
validate a policy without importing the engine (which runs in its own worker process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backends.options import reject_unknown

if TYPE_CHECKING:
    import torch

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class EngineOptions:
    """The `options:` of a `kind: paged` backend. Unknown keys are an error."""

    block_size: int = 16
    kv_cache_gib: float = 1.0  # CPU: the KV pool's size
    gpu_memory_utilization: float = 0.9  # GPU: fraction of device memory for weights + KV pool
    num_blocks: int | None = None  # explicit pool size (tests); overrides the budget
    max_num_seqs: int = 64  # cap on running sequences
    max_num_batched_tokens: int = 2048  # token budget per step
    max_model_len: int | None = None  # default: the model's context, capped by the pool
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"  # "auto" picks cuda when available
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    watermark: float = 0.01  # fraction of blocks kept free when admitting new sequences
    seed: int = 0  # dummy weights' seed
    num_threads: int | None = None  # torch intra-op threads on CPU
    kernels: str = "auto"  # auto: triton on CUDA, torch on CPU; or "torch" / "triton"
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    cuda_graph_max_batch: int | None = None  # largest captured decode batch (default max_num_seqs)
    # Overlap a step's host work with the GPU: sampled tokens stay on the device as the next
    # step's inputs and are read back one step later. None: on for CUDA, off on CPU.
    async_scheduling: bool | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> EngineOptions:
        reject_unknown(cls, options, "paged")
        opts = cls(**options)
        if opts.block_size <= 0 or opts.max_num_seqs <= 0 or opts.max_num_batched_tokens <= 0:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if opts.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be auto, torch or triton, not {opts.kernels!r}")
        if opts.dtype != "auto" and opts.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {opts.dtype!r}; use one of auto, {', '.join(_DTYPES)}")
        return opts

    def kernel_kind(self, device: torch.device) -> str:
        """The kernels to use on this device: "triton" or "torch"."""
        if self.kernels == "auto":
            return "triton" if device.type == "cuda" else "torch"
        return self.kernels

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            return getattr(torch, _DTYPES[self.dtype])
        except KeyError:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {', '.join(_DTYPES)}") from None
