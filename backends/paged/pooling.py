"""The paged engine's embedding requests and their one output.

An embedding request's inputs become prefill-only sequences of one SequenceGroup (input i is
choice i): scheduled beside generations under the same token budget (chunked prefill
allowed), pooled chunk by chunk by the model runner (`Sequence.pooling`), finished and freed
after their last chunk. The request's one output, with every vector, comes once its last
input is done."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backends.embeddings import Pooling


@dataclass
class PoolingRequest:
    """Inputs (token ids) to pool into one vector each."""

    request_id: str
    inputs: list[list[int]]
    pooling: Pooling
    priority: int = 0


@dataclass
class EmbeddingOutput:
    """A finished embedding request's pooled vectors (float32, not normalised), in input
    order. `final` as a GenerationDelta's: the request's last output."""

    vectors: list[np.ndarray]
    num_tokens: int
    final: bool = field(default=True, init=False)
