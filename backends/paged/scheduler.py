"""Continuous batching: which sequences run this step, and how many tokens each.

Each step has a token budget (max_num_batched_tokens). Running sequences go first, in
priority-then-arrival order: a decode costs one token, an unfinished prefill takes a chunk of
what is left of the budget (chunked prefill mixed with decodes). Then waiting sequences are
admitted FCFS within priority while the budget, the running-sequence cap and the KV blocks
(above the watermark) allow. When a running sequence needs a block and none is free, the
lowest-priority, latest-arrived running sequence is preempted by recompute: its blocks are
freed and it goes back to the front of its priority class in the waiting queue, keeping its
output so far. No request is ever dropped.

The scheduler also owns each sequence's progress (vLLM v1's split): the model runner only
reads a plan. `update_after_launch(plan)` counts the plan's tokens as computed, holds a PENDING
place for each token being sampled and registers the blocks now full of known tokens;
`update_from_output(runner_output)` fills the places in, finishes sequences on a stop token or
at their length and frees them. With async scheduling the next `schedule()` runs between the
two, while the sampled tokens are still on the device. A sequence's grammar (`constraint`)
advances here too, with each token as it becomes known.

The choices of an n > 1 request wait until choice 0 (the parent) has computed its prompt and
are then admitted on its full prompt blocks, shared by reference (BlockManager.fork), so the
prompt is computed once. A choice whose parent finished or was preempted first computes its
prompt itself (through the prefix cache where it is on).
"""

from __future__ import annotations

import bisect
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from backends.paged.block_manager import BlockManager
from backends.paged.sequence import PENDING, Sequence, SeqStatus

if TYPE_CHECKING:
    from backends.paged.model_runner import RunnerOutput
    from backends.paged.sampler import Sample

log = logging.getLogger(__name__)


class ScheduledSeq:
    """One sequence's share of a step.

    A plain slotted class, not a dataclass: a decode step makes one per running sequence, and
    at batch 256 their construction is a measurable part of the host's step."""

    __slots__ = ("seq", "num_tokens", "samples")

    def __init__(self, seq: Sequence, num_tokens: int, samples: bool | None = None) -> None:
        self.seq = seq
        self.num_tokens = num_tokens  # new tokens computed this step (1 for a decode)
        # Whether this step reaches the end of the sequence's tokens, so it samples the next one
        # (an embedding input never samples: its last chunk finishes it). Fixed when planned:
        # num_computed moves before the step's tokens are read back. Callers that know it
        # (the scheduler's decode path) pass it.
        if samples is None:
            samples = seq.num_computed + num_tokens == seq.num_tokens and seq.pooling is None
        self.samples = samples

    def __repr__(self) -> str:
        return f"ScheduledSeq({self.seq.request_id!r}, {self.num_tokens}, samples={self.samples})"


@dataclass
class SchedulerOutput:
    """A step's plan: what runs (running sequences first, then new admissions) and who was preempted."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class SampledToken(msgspec.Struct):
    """A sequence's newly known output token, as `update_from_output` hands it on. A msgspec
    Struct: one per running sequence per step, built in a fifth of a dataclass's time."""

    seq: Sequence
    token_id: int
    index: int  # its place in seq.output_ids
    # "stop" (a stop token) or "length", the sequence then finished and freed; stop strings are
    # found later, in the text (OutputProcessor).
    finish_reason: str | None
    sample: Sample | None = None  # the host sampler's result (carries logprobs); None from the device path


class Scheduler:
    """Continuous batching over one block pool (see the module docstring)."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or sys.maxsize  # a sequence reaching it ends with "length"
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.num_preemptions = 0
        self.num_grammar_rejections = 0  # tokens a grammar refused although its mask allowed them (a bug)

    # -- queue management ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue seq (new, or preempted) by priority, then arrival."""
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
        if seq.pooling is not None:
            seq.pooling.reset()  # its chunks are computed again, and pooled again
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)  # its early arrival puts it ahead of later requests of its priority

    def finish_pooled(self, plan: SchedulerOutput) -> list[Sequence]:
        """The embedding inputs whose last chunk `plan` launched (after update_after_launch):
        finished and freed now, their blocks back in the pool for the next step."""
        done = [s.seq for s in plan.scheduled if s.seq.pooling is not None and s.seq.num_computed == s.seq.num_tokens]
        for seq in done:
            self.remove(seq)
        return done

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    # -- the step's plan -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan the next step and allocate its blocks (preempting when the pool runs dry).
        Progress is left to update_after_launch / update_from_output."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        bs = self.bm.block_size
        scheduled = out.scheduled
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if budget == 0:
                break
            if seq.final_pending:  # its last token is in flight: nothing more to compute
                i += 1
                continue
            computed = seq.num_computed
            remaining = len(seq.prompt_ids) + len(seq.output_ids) - computed
            if remaining == 1 and computed < len(seq.block_table) * bs:
                # The decode fast path: one token into a block it already has, so nothing to
                # allocate or preempt; it samples unless it is an embedding input's last token.
                scheduled.append(ScheduledSeq(seq, 1, seq.pooling is None))
                budget -= 1
                i += 1
                continue
            n = min(remaining, budget)
            need = self.bm.blocks_needed(seq, computed + n)
            if need:  # most decode steps fit in the last block: nothing to allocate
                while not self.bm.can_allocate(need):
                    victim = self.running[-1]
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    break  # seq itself was the latest: everything after it is gone too
                self.bm.allocate(seq, computed + n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # Admit new work only when nothing had to be preempted: the pool is under pressure.
        w = 0
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[w]
            if not seq.block_table:
                if self._waits_for_parent(seq):
                    w += 1  # passed over, not blocking: the work behind it does not wait for its parent
                    continue
                seq.num_computed = self._start(seq)
            remaining = seq.num_tokens - seq.num_computed
            if not self.enable_chunked_prefill and remaining > budget:
                self._unmatch(seq)
                break
            n = min(remaining, budget)
            if not self.bm.can_allocate(self.bm.blocks_needed(seq, seq.num_computed + n), watermark=True):
                self._unmatch(seq)
                break
            self.bm.allocate(seq, seq.num_computed + n)
            self.waiting.pop(w)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=Sequence.sort_key)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    @staticmethod
    def _waits_for_parent(seq: Sequence) -> bool:
        """Whether a further choice waits for its parent's prompt: the parent is live, has not
        been preempted, and the prompt's KV is not computed (launched) yet."""
        p = seq.parent
        return p is not None and p.status is not SeqStatus.FINISHED and not p.num_preemptions and p.num_computed < len(p.prompt_ids)

    def _start(self, seq: Sequence) -> int:
        """Tokens a waiting sequence without blocks starts with: its parent's prompt blocks
        when the parent is running with its prompt computed, else the prefix cache's. An
        embedding input starts from nothing: its pooling needs every token's hidden state
        (mean), which cached blocks would skip."""
        if seq.pooling is not None:
            return 0
        p = seq.parent
        if p is not None and p.status is SeqStatus.RUNNING and p.num_computed >= len(p.prompt_ids):
            return self.bm.fork(p, seq)
        return self.bm.match_prefix(seq)

    def _unmatch(self, seq: Sequence) -> None:
        """Give back prefix-cache blocks a waiting sequence took but cannot use yet."""
        self.bm.free(seq)
        seq.num_computed = 0

    # -- progress ------------------------------------------------------------------------------

    def update_after_launch(self, plan: SchedulerOutput) -> None:
        """The runner has launched `plan`: its tokens count as computed, each sequence that
        samples gets a PENDING output token (so the next plan sees the right counts before the
        value is known), and blocks now full of known tokens are registered for prefix caching."""
        bm = self.bm
        caching, bs = bm.enable_prefix_caching, bm.block_size
        max_len = self.max_model_len
        for s in plan.scheduled:
            seq = s.seq
            seq.num_computed += s.num_tokens
            out = seq.output_ids
            if s.samples:
                index = len(out)
                out.append(PENDING)
                seq.num_pending += 1
                if index + 1 >= seq.sampling.max_tokens or len(seq.prompt_ids) + index + 1 >= max_len:  # _is_last, inlined
                    seq.final_pending = True  # ends with "length" whatever the token is: not scheduled again
            # Only when a block may have filled: commit_full_blocks would find nothing new.
            if caching and min(seq.num_computed, len(seq.prompt_ids) + len(out) - seq.num_pending) >= (len(seq.block_hashes) + 1) * bs:
                bm.commit_full_blocks(seq, seq.num_tokens - seq.num_pending)

    def update_from_output(self, output: RunnerOutput) -> list[SampledToken]:
        """Fill in the sampled tokens of a launched step (its oldest PENDING place, for each
        sequence), register the blocks they complete, and finish and free the sequences that
        hit a stop token or their length. Returns the new tokens in the output's order."""
        new: list[SampledToken] = []
        bm = self.bm
        caching, bs = bm.enable_prefix_caching, bm.block_size
        max_len = self.max_model_len
        finished = SeqStatus.FINISHED
        for seq, token, sample in zip(output.seqs, output.token_ids, output.samples):
            if seq.status is finished:  # finished by an earlier token, or aborted
                continue
            out = seq.output_ids
            index = len(out) - seq.num_pending
            out[index] = token
            seq.num_pending -= 1
            known = len(seq.prompt_ids) + len(out) - seq.num_pending
            if caching and min(seq.num_computed, known) >= (len(seq.block_hashes) + 1) * bs:
                bm.commit_full_blocks(seq, known)
            finish = None
            # Stop checks on token ids: a set lookup, no text involved.
            if token in seq.stop_token_ids:
                finish = "stop"
            elif seq.constraint is not None and not seq.constraint.accept(token):
                self._grammar_rejected(seq, token)
                finish = "stop"
            elif index + 1 >= seq.sampling.max_tokens or len(seq.prompt_ids) + index + 1 >= max_len:  # _is_last, inlined
                finish = "length"
            if finish is not None:
                self.remove(seq)
            new.append(SampledToken(seq, token, index, finish, sample))
        return new

    def _grammar_rejected(self, seq: Sequence, token: int) -> None:
        """The mask allowed a token the grammar then refused (an llguidance or masking bug):
        the sequence ends with "stop" on the text so far. Logged once, counted always."""
        self.num_grammar_rejections += 1
        if self.num_grammar_rejections == 1:
            log.warning("grammar refused token %d of request %s (choice %d); finishing it (logged once)", token, seq.request_id, seq.index)

    def _is_last(self, seq: Sequence, index: int) -> bool:
        """Whether output token `index` is the sequence's last: max_tokens, or the context's end."""
        return index + 1 >= seq.sampling.max_tokens or len(seq.prompt_ids) + index + 1 >= self.max_model_len
