"""The `options:` of a `kind: paged` backend, torch-free so that the serving process can
validate a policy without importing the engine (which runs in its own worker process)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationInfo, field_validator

from backends.options import BackendOptions, EmbeddingOptions

if TYPE_CHECKING:
    import torch

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DType = Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]


class EngineOptions(BackendOptions, EmbeddingOptions):
    """The `options:` of a `kind: paged` backend. Unknown keys and mistyped values are errors.
    The embedding options (`pooling`, `matryoshka`) come from EmbeddingOptions."""

    kind = "paged"

    block_size: int = Field(default=16, gt=0)
    kv_cache_gib: float = 1.0  # CPU: the KV pool's size
    gpu_memory_utilization: float = 0.9  # GPU: fraction of device memory for weights + KV pool
    num_blocks: int | None = None  # explicit pool size (tests); overrides the budget
    max_num_seqs: int = Field(default=64, gt=0)  # cap on running sequences
    max_num_batched_tokens: int = Field(default=2048, gt=0)  # token budget per step
    max_model_len: int | None = None  # default: the model's context, capped by the pool
    dtype: DType = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"  # "auto" picks cuda when available
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    watermark: float = 0.01  # fraction of blocks kept free when admitting new sequences
    seed: int = 0  # dummy weights' seed
    num_threads: int | None = None  # torch intra-op threads on CPU
    kernels: Literal["auto", "torch", "triton"] = "auto"  # auto: triton on CUDA, torch on CPU
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    cuda_graph_max_batch: int | None = None  # largest captured decode batch (default max_num_seqs)
    # Overlap a step's host work with the GPU: sampled tokens stay on the device as the next
    # step's inputs and are read back one step later. None: on for CUDA, off on CPU.
    async_scheduling: bool | None = None
    # fp8: every decoder linear layer's weights in float8_e4m3fn with per-channel scales, its
    # inputs quantized per token, GEMMs on FP8 tensor cores (backends/paged/fp8.py). CUDA only,
    # compute capability 8.9+; the embeddings and lm_head stay in `dtype` (bf16), the KV cache
    # in `kv_cache_dtype`.
    quantization: Literal["fp8"] | None = None
    # The KV pool's element type (vLLM's option and values): auto, the model's `dtype`; fp8 (or
    # fp8_e4m3), float8_e4m3fn with a K and a V scale per layer (kv_cache.py): half a bf16
    # pool's bytes per block, so twice the blocks for the same memory. Any device: the CPU
    # path converts with torch's float8 casts, the GPU's in the Triton kernels.
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    # Ranks the model is split across (tensor parallelism, backends/paged/parallel.py): one
    # process per rank, NCCL between GPUs (one GPU each), gloo on the CPU. The model's shape
    # must split evenly (check_tensor_parallel, once the shape is known).
    tensor_parallel_size: int = Field(default=1, ge=1)

    @field_validator("quantization")
    @classmethod
    def _fp8_where_it_runs(cls, value: str | None, info: ValidationInfo) -> str | None:
        """What can be known without torch: FP8 is for the GPU, computing in bf16. A device
        of `auto` and the GPU's own support are checked at start (fp8.check_fp8_support)."""
        if value != "fp8":
            return value
        if info.data.get("device", "cpu") == "cpu":
            raise ValueError(
                "fp8 runs on CUDA GPUs with FP8 tensor cores (compute capability 8.9+), not on device cpu "
                "(the default device): set device: cuda, or leave quantization unset"
            )
        dtype = info.data.get("dtype", "auto")
        if dtype not in ("auto", "bfloat16", "bf16"):
            raise ValueError(f"fp8 computes its GEMM outputs in bfloat16; dtype {dtype} does not go with it (use auto or bfloat16)")
        return value

    def check_tensor_parallel(self, *, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
        """Raise ValueError, naming the option, unless the model splits evenly over
        `tensor_parallel_size` ranks: query heads and the MLP's intermediate size must divide by
        it, and KV heads either divide by it (each rank holds its share) or divide it (each rank
        holds the one KV head its query heads read, replicated). The vocabulary needs nothing:
        it is padded to a multiple of the size."""
        n = self.tensor_parallel_size
        if n == 1:
            return
        prefix = f"paged backend option tensor_parallel_size: {n}"
        if num_heads % n:
            raise ValueError(f"{prefix} does not divide the model's {num_heads} attention heads; use a divisor of {num_heads}")
        if intermediate_size % n:
            raise ValueError(f"{prefix} does not divide the model's MLP intermediate size {intermediate_size}")
        if num_kv_heads % n and n % num_kv_heads:
            raise ValueError(
                f"{prefix} and the model's {num_kv_heads} KV heads: one must divide the other "
                "(KV heads are split across ranks, or replicated when there are more ranks than KV heads)"
            )

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV pool's dtype for a model computing in `model_dtype`: that dtype ("auto"), or
        float8_e4m3fn ("fp8", "fp8_e4m3")."""
        import torch

        return model_dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn

    def kernel_kind(self, device: torch.device) -> str:
        """The kernels to use on this device: "triton" or "torch"."""
        if self.kernels == "auto":
            return "triton" if device.type == "cuda" else "torch"
        return self.kernels

    def torch_device(self) -> torch.device:
        """The device to run on ("auto": CUDA where there is one)."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The weights' dtype on this device ("auto": bfloat16 on CUDA, else float32); the KV
        cache's too unless kv_cache_dtype says otherwise."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, _DTYPES[self.dtype])
