"""Scheduler: token budget, chunked prefill, running cap, FCFS within priority, preemption."""

from __future__ import annotations

from backends.generation import SamplingParams
from backends.paged.block_manager import BlockManager
from backends.paged.scheduler import Scheduler
from backends.paged.sequence import Sequence, SeqStatus


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
