"""The `options:` of a `kind: llamacpp` backend, free of llama_cpp so that the serving process
can validate a policy without loading native code (the runner lives in a worker process)."""

from __future__ import annotations

from pydantic import Field

from backends.options import BackendOptions, EmbeddingOptions


class LlamaCppOptions(BackendOptions, EmbeddingOptions):
    """Unknown keys and mistyped values are errors. The embedding options (`pooling`,
    `matryoshka`) come from EmbeddingOptions."""

    kind = "llamacpp"

    instances: int = Field(default=1, ge=1)  # Llama instances; each serves one request at a time
    max_queue: int = Field(default=16, ge=0)  # requests waiting for an instance; more get 503 + Retry-After
    n_ctx: int = Field(default=4096, ge=16)  # context window in tokens (prompt + completion)
    n_threads: int | None = None  # default: every CPU this process may use
    n_batch: int = 512
    n_gpu_layers: int = 0
