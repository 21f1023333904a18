"""The `options:` of a `kind: llamacpp` backend, free of llama_cpp so that the serving process
can validate a policy without loading native code (the runner lives in a worker process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.options import reject_unknown


@dataclass(frozen=True)
class LlamaCppOptions:
    """Unknown keys are an error."""

    instances: int = 1  # Llama instances; each serves one request at a time
    max_queue: int = 16  # requests waiting for an instance; more get 503 + Retry-After
    n_ctx: int = 4096  # context window in tokens (prompt + completion)
    n_threads: int | None = None  # default: every core
    n_batch: int = 512
    n_gpu_layers: int = 0

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> LlamaCppOptions:
        reject_unknown(cls, options, "llamacpp")
        opts = cls(**options)
        if opts.instances < 1 or opts.max_queue < 0 or opts.n_ctx < 16:
            raise ValueError("instances must be >= 1, max_queue >= 0 and n_ctx >= 16")
        return opts
