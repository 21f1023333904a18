"""Continuous batching: which sequences run this step, and how many tokens each.

Each step has a token budget (max_num_batched_tokens). Running sequences go first, in
priority-then-arrival order: a decode costs one token, an unfinished prefill takes a chunk of
what is left of the budget (chunked prefill mixed with decodes). Then waiting sequences are
admitted FCFS within priority while the budget, the running-sequence cap and the KV blocks
(above the watermark) allow. When a running sequence needs a block and none is free, the
lowest-priority, latest-arrived running sequence is preempted by recompute: its blocks are
freed and it goes back to the front of its priority class in the waiting queue, keeping its
output so far. No request is ever dropped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from backends.paged.block_manager import BlockManager
from backends.paged.sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step (1 for a decode)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's tokens, so it samples the next."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of whichever queue holds it and free its blocks (finish or abort)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)  # its early arrival puts it ahead of later requests of its priority

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step's plan -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if budget == 0:
                break
            if seq.final_pending:  # its last token is in flight: nothing more to compute
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.bm.blocks_needed(seq, seq.num_computed + n)
            if need:  # most decode steps fit in the last block: nothing to allocate
                while not self.bm.can_allocate(need):
                    victim = self.running[-1]
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    break  # seq itself was the latest: everything after it is gone too
                self.bm.allocate(seq, seq.num_computed + n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # Admit new work only when nothing had to be preempted: the pool is under pressure.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not seq.block_table:
                seq.num_computed = self.bm.match_prefix(seq)
            remaining = seq.num_tokens - seq.num_computed
            if not self.enable_chunked_prefill and remaining > budget:
                self._unmatch(seq)
                break
            n = min(remaining, budget)
            if not self.bm.can_allocate(self.bm.blocks_needed(seq, seq.num_computed + n), watermark=True):
                self._unmatch(seq)
                break
            self.bm.allocate(seq, seq.num_computed + n)
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=Sequence.sort_key)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _unmatch(self, seq: Sequence) -> None:
        """Give back prefix-cache blocks a waiting sequence took but cannot use yet."""
        self.bm.free(seq)
        seq.num_computed = 0
