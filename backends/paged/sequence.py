"""A request's state inside the engine: one Sequence per choice (OpenAI's n) with its tokens,
how many are in the KV cache, its blocks and its grammar state; a SequenceGroup per request."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends.generation import SamplingParams

if TYPE_CHECKING:
    from backends.embeddings import PoolState
    from backends.grammar import Constraint

_arrival = itertools.count()

# An output token sampled on the device whose value the host has not read yet (async
# scheduling); real token ids are >= 0.
PENDING = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generation. `tokens` is prompt + output; the first `num_computed` are in the cache."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    priority: int = 0
    arrival: int = field(default_factory=lambda: next(_arrival))
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    # Digest chain of this sequence's full, computed blocks (prefix caching), in block order.
    block_hashes: list[bytes] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    # Tokens that end the sequence with "stop" (EOS unless ignore_eos, and stop_token_ids).
    stop_token_ids: frozenset[int] = frozenset()
    # The model runner's per-request sampling state (seeded generator, penalty history).
    sampler: Any = None
    # Trailing output_ids that are PENDING (launched, not read back yet), and whether the
    # newest of them is certain to be the last token (length), whatever its value.
    num_pending: int = 0
    final_pending: bool = False
    # The choice (OpenAI's n) this sequence generates, and for choices > 0 the request's choice
    # 0, whose prompt KV blocks it shares once they are computed (Scheduler, BlockManager.fork).
    index: int = 0
    parent: Sequence | None = None
    # The grammar its output must follow (advanced by the scheduler with each token), or None.
    constraint: Constraint | None = None
    # An embedding input: prefill only, its hidden rows pooled chunk by chunk (the model
    # runner adds them), finished after its last chunk; it samples nothing. None: a generation.
    pooling: PoolState | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    def sort_key(self) -> tuple[int, int]:
        """FCFS within priority (lower priority value runs first)."""
        return (self.priority, self.arrival)


@dataclass(eq=False)
class SequenceGroup:
    """One request's choices, choice 0 first. Its last delta is `final` when the last of them
    finishes."""

    request_id: str
    seqs: list[Sequence]
    num_unfinished: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_unfinished = len(self.seqs)
