"""Admission control: the pure queue (priority, deadlines, Retry-After, drain rate) and the
async controller (waiting, waking, dropping cancelled waiters)."""

from __future__ import annotations

import asyncio

import pytest

from backends.protocol import Overloaded
from gateway.admission import AdmissionController, AdmissionRejected
from policies.admission import AdmissionConfig, AdmissionQueue, DrainEstimator, Priority, ShedReason, Verdict

I, B = Priority.INTERACTIVE, Priority.BATCH


def test_drain_rate_is_slots_over_mean_hold_time() -> None:
    d = DrainEstimator(initial_hold_s=2.0, alpha=0.5)
    assert d.rate(4) == pytest.approx(2.0)  # the prior: 4 slots / 2 s
    d.observe_hold(1.0)  # the first sample replaces the prior
    assert d.rate(4) == pytest.approx(4.0)
    d.observe_hold(3.0)  # EWMA: 1 + 0.5 * (3 - 1) = 2
    assert d.mean_hold_s == pytest.approx(2.0)
    assert d.rate(10) == pytest.approx(5.0)


def test_interactive_goes_before_batch_and_fcfs_within_a_class() -> None:
    q = AdmissionQueue(AdmissionConfig(default_deadline_s=1000))
    holder = q.offer(0.0, 1, I).ticket  # takes the only slot
    order = [q.offer(0.1 * i, 1, p) for i, p in enumerate([B, B, I, B, I], start=1)]
    assert all(d.verdict is Verdict.QUEUE for d in order)
    assert q.depth == 5 and q.depth_by_priority() == {"interactive": 2, "batch": 3}
    served = []
    current = holder
    for step in range(5):
        q.release(current, 1.0 + step)
        admitted, expired = q.pump(1.0 + step, 1)
        assert not expired and len(admitted) == 1
        current = admitted[0]
        served.append((current.priority, current.seq))
    seqs = [d.ticket.seq for d in order]
    assert served == [(I, seqs[2]), (I, seqs[4]), (B, seqs[0]), (B, seqs[1]), (B, seqs[3])]
    assert q.wait_count == 6 and q.wait_max_s == pytest.approx(5.0 - 0.4)  # the last batch request


def test_a_deadline_the_queue_would_miss_is_rejected_at_once_with_retry_after() -> None:
    q = AdmissionQueue(AdmissionConfig(default_deadline_s=100, initial_hold_s=1.0))
    slots = [q.offer(0.0, 2, I).ticket for _ in range(2)]
    for s in slots:  # measured: slots are held 1 s -> 2 slots drain 2 requests/s
        q.release(s, 1.0)
        q.offer(1.0, 2, I)
    for _ in range(9):
        assert q.offer(1.0, 2, I).verdict is Verdict.QUEUE
    # 9 ahead: the 10th gets a slot after (9 + 1) / 2 = 5 s. A 2 s deadline cannot be met.
    d = q.offer(1.0, 2, I, deadline_s=2.0)
    assert d.verdict is Verdict.REJECT and d.reason is ShedReason.DEADLINE_UNMEETABLE
    assert d.retry_after == 3  # ceil(5 - 2): when the queue will have drained enough
    assert q.offer(1.0, 2, I, deadline_s=6.0).verdict is Verdict.QUEUE
    # Batch work queued behind doesn't count against an interactive request's estimate.
    assert q.offer(1.0, 2, B, deadline_s=100).verdict is Verdict.QUEUE
    assert q.shed == {"deadline_unmeetable": 1}


def test_queue_full_and_expiry_in_the_queue() -> None:
    q = AdmissionQueue(AdmissionConfig(max_queue=2, default_deadline_s=10))
    holder = q.offer(0.0, 1).ticket
    waiting = [q.offer(0.0, 1).ticket for _ in range(2)]
    full = q.offer(0.0, 1)
    assert full.verdict is Verdict.REJECT and full.reason is ShedReason.QUEUE_FULL and full.retry_after >= 1
    q.release(holder, 20.0)  # both waiters' deadlines (10 s) passed
    admitted, expired = q.pump(20.0, 1)
    assert admitted == [] and expired == waiting
    assert q.shed == {"queue_full": 1, "deadline_expired": 2} and q.in_use == 0


async def test_controller_admits_queues_and_wakes_in_priority_order() -> None:
    c = AdmissionController(lambda: 1, max_queue=10, default_deadline_s=10)
    order: list[str] = []
    gate = asyncio.Event()

    async def job(name: str, prio: str) -> None:
        ticket = await c.acquire(prio)
        try:
            order.append(name)
            await gate.wait()
        finally:
            c.release(ticket)

    first = asyncio.create_task(job("first", "interactive"))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(job(n, p)) for n, p in [("batch", "batch"), ("inter", "interactive")]]
    await asyncio.sleep(0.01)
    assert order == ["first"] and c.depth == 2 and c.in_use == 1
    gate.set()
    await asyncio.gather(first, *tasks)
    assert order == ["first", "inter", "batch"]
    assert c.in_use == 0 and c.depth == 0 and c.wait_count == 3


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    waits: list[float] = []
    c = AdmissionController(lambda: 1, max_queue=10, default_deadline_s=10, on_wait=waits.append)
    holder = await c.acquire()
    gone = asyncio.create_task(c.acquire())  # its client will disconnect
    stays = asyncio.create_task(c.acquire("batch"))
    await asyncio.sleep(0.01)
    assert c.depth == 2
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert c.depth == 1 and c.shed == {"client_gone": 1}
    c.release(holder)  # the slot goes to the one still waiting, not to the departed
    ticket = await asyncio.wait_for(stays, 1)
    assert c.in_use == 1 and ticket.priority is Priority.BATCH
    c.release(ticket)
    assert c.in_use == 0 and len(waits) == 2


async def test_controller_rejects_with_503_and_retry_after() -> None:
    c = AdmissionController(lambda: 1, max_queue=0)
    held = await c.acquire()
    with pytest.raises(AdmissionRejected) as info:
        await c.acquire()
    err = info.value
    assert isinstance(err, Overloaded) and err.status == 503 and err.retry_after >= 1
    assert err.reason is ShedReason.QUEUE_FULL and c.shed == {"queue_full": 1}
    c.release(held)


async def test_a_waiter_whose_deadline_passes_is_shed() -> None:
    # The drain estimate (10 ms holds) says it fits, so it is queued, then nothing frees.
    c = AdmissionController(lambda: 1, config=AdmissionConfig(default_deadline_s=0.05, initial_hold_s=0.01))
    held = await c.acquire()
    with pytest.raises(AdmissionRejected) as info:
        await c.acquire()  # nothing is released within 50 ms
    assert info.value.reason is ShedReason.DEADLINE_EXPIRED
    assert c.depth == 0 and c.shed == {"deadline_expired": 1}
    c.release(held)
    assert c.in_use == 0


async def test_a_grown_limit_admits_waiters() -> None:
    limit = [1]
    c = AdmissionController(lambda: limit[0], default_deadline_s=10)
    held = await c.acquire()
    waiter = asyncio.create_task(c.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    limit[0] = 2  # a replica joined the pool
    c.pump()
    t = await asyncio.wait_for(waiter, 1)
    assert c.in_use == 2
    c.release(t)
    c.release(held)
