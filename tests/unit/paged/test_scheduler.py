"""Scheduler: token budget, chunked prefill, running cap, FCFS within priority, preemption,
and progress (placeholders at launch, tokens, stop and length finishing)."""

from __future__ import annotations

from backends.generation import SamplingParams
from backends.paged.block_manager import BlockManager
from backends.paged.model_runner import RunnerOutput
from backends.paged.scheduler import Scheduler
from backends.paged.sequence import PENDING, Sequence, SeqStatus


def seq(n: int, rid: str, priority: int = 0) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=100), priority=priority)


def advance(sched: Scheduler, out) -> None:
    """Apply a plan as the engine would, sampling token 7 for sequences that reach their end."""
    for s in out.scheduled:
        samples = s.samples
        s.seq.num_computed += s.num_tokens
        if samples:
            s.seq.output_ids.append(7)


def test_token_budget_chunks_prefill_and_mixes_with_decodes() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a = seq(4, "a")
    sched.add(a)
    advance(sched, sched.schedule())  # a prefilled, now decoding
    b = seq(25, "b")
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.num_tokens == 10
    assert not out.scheduled[1].samples  # a partial prefill does not sample
    advance(sched, out)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 9)]
    advance(sched, out)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    assert out.scheduled[1].samples


def test_running_cap() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(3, f"r{i}"))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["r0", "r1"]
    assert [s.request_id for s in sched.waiting] == ["r2"]


def test_fcfs_within_priority() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100)
    sched.add(seq(3, "batch-early", priority=1))
    sched.add(seq(3, "interactive-1", priority=0))
    sched.add(seq(3, "interactive-2", priority=0))
    assert [s.request_id for s in sched.waiting] == ["interactive-1", "interactive-2", "batch-early"]


def test_admission_stops_at_head_of_line_when_blocks_run_short() -> None:
    sched = Scheduler(BlockManager(6, 4, watermark=0.0), max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(seq(20, "big"))  # needs 5 blocks
    sched.add(seq(8, "small"))  # needs 2: does not jump the queue
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["big"]
    assert [s.request_id for s in sched.waiting] == ["small"]


def test_preemption_is_latest_first_and_keeps_the_request() -> None:
    bm = BlockManager(4, 2, watermark=0.0)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(3, "a"), seq(3, "b")  # 2 blocks each: the pool is full after prefill
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())
    assert bm.num_free_blocks == 0
    advance(sched, sched.schedule())  # both decode into their second block's last slot
    out = sched.schedule()  # both need a third block: b (the latest) is preempted for a
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert b.output_ids == [7, 7]  # recompute keeps what was generated
    assert sched.waiting == [b] and sched.num_preemptions == 1
    sched.remove(a)
    out = sched.schedule()  # b comes back and recomputes prompt + output
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("b", 5)]


def launch_and_sample(sched: Scheduler, out, token: int) -> list:
    """As the engine does: launch the plan, then give every sampling sequence `token`."""
    sched.update_after_launch(out)
    seqs = [s.seq for s in out.scheduled if s.samples]
    return sched.update_from_output(RunnerOutput(seqs, [token] * len(seqs), [None] * len(seqs)))


def test_progress_placeholders_then_tokens() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a = seq(6, "a")
    sched.add(a)
    out = sched.schedule()
    sched.update_after_launch(out)
    # Launched, not read back: the token has a place, and the next plan is a decode over it.
    assert a.num_computed == 6 and a.output_ids == [PENDING] and a.num_pending == 1
    assert len(a.block_hashes) == 1  # the one full block of known tokens is registered
    nxt = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens, s.samples) for s in nxt.scheduled] == [("a", 1, True)]
    new = sched.update_from_output(RunnerOutput([a], [42], [None]))
    assert [(t.token_id, t.index, t.finish_reason) for t in new] == [(42, 0, None)]
    assert a.output_ids == [42] and a.num_pending == 0


def test_stop_token_and_length_finish_and_free() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, max_model_len=9)
    stop = seq(3, "stop")
    stop.stop_token_ids = frozenset({2})
    short = Sequence("short", [1, 2, 3], SamplingParams(max_tokens=2))
    ctx = seq(7, "ctx")  # 7 prompt tokens + 2 outputs reach max_model_len 9
    for s in (stop, short, ctx):
        sched.add(s)
    new = launch_and_sample(sched, sched.schedule(), 5)
    assert [t.finish_reason for t in new] == [None, None, None]
    assert short.final_pending is False
    out = sched.schedule()
    sched.update_after_launch(out)
    assert short.final_pending and ctx.final_pending  # their next token is their last
    # stop still decodes; short and ctx wait for their last token instead of running again.
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["stop"]
    new = sched.update_from_output(RunnerOutput([stop, short, ctx], [2, 5, 5], [None] * 3))
    assert [(t.seq.request_id, t.finish_reason) for t in new] == [("stop", "stop"), ("short", "length"), ("ctx", "length")]
    assert all(s.status is SeqStatus.FINISHED for s in (stop, short, ctx))
    assert not sched.has_work() and bm.num_free_blocks == 64
    bm.check_invariants()


def test_tokens_of_a_finished_sequence_are_dropped() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = seq(3, "a")
    sched.add(a)
    sched.update_after_launch(sched.schedule())
    sched.remove(a)  # aborted while its token was in flight
    assert sched.update_from_output(RunnerOutput([a], [9], [None])) == []
    assert a.output_ids == [PENDING]
