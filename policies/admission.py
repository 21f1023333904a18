"""Admission control for one pool: a concurrency limit, a priority queue with deadlines, and
load shedding with a Retry-After computed from the measured drain rate.

Pure: every method takes `now` (monotonic seconds) from the caller, so tests and the
simulator drive time. `gateway/admission.py` wraps `AdmissionQueue` with asyncio futures;
`gateway/sim/simulator.py` drives the very same object from its event loop.

The model. A pool may run `limit` requests at once (normally the sum of its replicas'
reported max_running: beyond that the engines would only queue the request themselves, in
FCFS order, where priorities no longer apply). Over the limit, requests wait here, in order
of (priority class, arrival). A new request whose expected wait, estimated from the drain
rate, exceeds its deadline is refused at once (503 + Retry-After) rather than left to time
out in the queue: the client learns early and can go elsewhere.

The drain rate comes from Little's law: with `limit` slots each held for a mean of S
seconds, slots free up at limit / S per second while the pool is saturated. S is measured
(an exponentially weighted mean of slot hold times), so the estimate needs no saturation
to learn and does not confuse a quiet pool with a slow one.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field


class Priority(enum.IntEnum):
    """Scheduling classes, served strictly in this order (lower first)."""

    INTERACTIVE = 0
    BATCH = 1

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        """'interactive' / 'batch' (an API key's class), or the number."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown priority {value!r}; known: interactive, batch") from None
        return cls(value)


class ShedReason(str, enum.Enum):
    """Why a request was refused or dropped (a metric label)."""

    QUEUE_FULL = "queue_full"  # max_queue requests already wait
    DEADLINE_UNMEETABLE = "deadline_unmeetable"  # the expected wait exceeds the deadline: refused at once
    DEADLINE_EXPIRED = "deadline_expired"  # waited, and the deadline passed in the queue
    CLIENT_GONE = "client_gone"  # the waiting client disconnected (dropped, not answered)


@dataclass(frozen=True)
class AdmissionConfig:
    """One pool's admission parameters (the route's `admission:` section)."""

    max_queue: int = 1024
    default_deadline_s: float = 30.0  # a request's wait budget when it sets none
    min_retry_after_s: float = 1.0
    max_retry_after_s: float = 60.0
    # Before any slot was released, the mean hold time is unknown: assume this (seconds).
    initial_hold_s: float = 2.0
    hold_ewma_alpha: float = 0.05  # weight of each new hold time in the running mean

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.default_deadline_s <= 0 or self.initial_hold_s <= 0:
            raise ValueError("default_deadline_s and initial_hold_s must be > 0")
        if not 0 < self.hold_ewma_alpha <= 1:
            raise ValueError("hold_ewma_alpha must be in (0, 1]")
        if not 0 <= self.min_retry_after_s <= self.max_retry_after_s:
            raise ValueError("need 0 <= min_retry_after_s <= max_retry_after_s")


@dataclass(order=True)
class Ticket:
    """One request's place in the queue. Ordered by (priority, arrival sequence)."""

    priority: Priority
    seq: int
    arrived: float = field(compare=False)
    deadline: float = field(compare=False)  # absolute (monotonic seconds)
    admitted_at: float | None = field(default=None, compare=False)
    done: bool = field(default=False, compare=False)  # left the queue (admitted or dropped)


class Verdict(enum.Enum):
    ADMIT = "admit"  # run now (a slot is taken)
    QUEUE = "queue"  # wait for a slot
    REJECT = "reject"  # 503 now


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    ticket: Ticket
    reason: ShedReason | None = None
    retry_after: float | None = None  # seconds, for REJECT


class DrainEstimator:
    """Slots released per second, from the mean slot hold time (Little's law)."""

    def __init__(self, initial_hold_s: float, alpha: float) -> None:
        self.mean_hold_s = initial_hold_s
        self.alpha = alpha
        self.samples = 0

    def observe_hold(self, seconds: float) -> None:
        """A slot was held for `seconds`."""
        seconds = max(0.0, seconds)
        # The first sample replaces the prior outright: the prior is a guess, not data.
        self.mean_hold_s = seconds if self.samples == 0 else self.mean_hold_s + self.alpha * (seconds - self.mean_hold_s)
        self.samples += 1

    def rate(self, limit: int) -> float:
        """Slots freed per second by `limit` busy slots."""
        return max(1, limit) / max(self.mean_hold_s, 1e-3)


class AdmissionQueue:
    """One pool's slots and queue. Not thread-safe: one event loop drives it."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self.in_use = 0
        self.drain = DrainEstimator(self.config.initial_hold_s, self.config.hold_ewma_alpha)
        self._heap: list[Ticket] = []
        self._queued = 0  # tickets in the heap that are not done (cancelled ones stay until popped)
        self._seq = itertools.count()
        # Metrics: read by the gateway's exporter.
        self.shed: Counter[str] = Counter()
        self.admitted = 0
        self.wait_count = 0
        self.wait_sum_s = 0.0
        self.wait_max_s = 0.0

    # -- what the gateway reads --------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        return self._queued

    def depth_by_priority(self) -> dict[str, int]:
        """Waiting requests per class (a gauge per label)."""
        out = {p.name.lower(): 0 for p in Priority}
        for t in self._heap:
            if not t.done:
                out[t.priority.name.lower()] += 1
        return out

    def expected_wait(self, ahead: int, limit: int) -> float:
        """Seconds until `ahead` queued requests and then this one get a slot, at the
        drain rate of a saturated pool."""
        return (ahead + 1) / self.drain.rate(limit)

    def _ahead_of(self, priority: Priority) -> int:
        # Strict priority: everyone queued in this class or a better one goes first.
        return sum(1 for t in self._heap if not t.done and t.priority <= priority)

    def retry_after_for(self, wait: float, budget: float) -> float:
        """Retry-After for a request refused with `budget` seconds to spare and an expected
        wait of `wait`: when the queue will have drained enough for it to make it."""
        # When the queue will have drained enough for a request with this budget to make it.
        c = self.config
        return min(c.max_retry_after_s, max(c.min_retry_after_s, math.ceil(wait - budget)))

    # -- decisions -----------------------------------------------------------------------

    def offer(self, now: float, limit: int, priority: Priority = Priority.INTERACTIVE, deadline_s: float | None = None) -> Decision:
        """A new request arrives. ADMIT takes a slot; QUEUE puts the ticket in the queue (the
        caller waits for `release` / `pump` to hand it a slot); REJECT says why and when to
        come back."""
        budget = self.config.default_deadline_s if deadline_s is None else deadline_s
        ticket = Ticket(priority=Priority.parse(priority), seq=next(self._seq), arrived=now, deadline=now + budget)
        ahead = self._ahead_of(ticket.priority)
        if ahead == 0 and self.in_use < limit:
            self._take(ticket, now)
            return Decision(Verdict.ADMIT, ticket)
        if self._queued >= self.config.max_queue:
            wait = self.expected_wait(self._queued, limit)
            return self._reject(ticket, ShedReason.QUEUE_FULL, self.retry_after_for(wait, 0.0))
        wait = self.expected_wait(ahead, limit)
        if wait > budget:
            return self._reject(ticket, ShedReason.DEADLINE_UNMEETABLE, self.retry_after_for(wait, budget))
        heapq.heappush(self._heap, ticket)
        self._queued += 1
        return Decision(Verdict.QUEUE, ticket)

    def release(self, ticket: Ticket, now: float) -> None:
        """The request holding a slot finished (however it ended). Call `pump` next."""
        if ticket.admitted_at is None:
            raise ValueError("release of a ticket that holds no slot")
        self.in_use -= 1
        self.drain.observe_hold(now - ticket.admitted_at)
        ticket.admitted_at = None  # a second release is a bug: make it raise

    def pump(self, now: float, limit: int) -> tuple[list[Ticket], list[Ticket]]:
        """Hand free slots to the queue's head. Returns (admitted, expired): tickets that now
        hold a slot, and tickets whose deadline passed while they waited (shed)."""
        admitted: list[Ticket] = []
        expired: list[Ticket] = []
        while self._heap and (self._heap[0].done or self.in_use < limit):
            t = heapq.heappop(self._heap)
            if t.done:
                continue
            self._queued -= 1
            t.done = True
            if t.deadline < now:
                self.shed[ShedReason.DEADLINE_EXPIRED.value] += 1
                expired.append(t)
                continue
            self._take(t, now)
            admitted.append(t)
        return admitted, expired

    def abandon(self, ticket: Ticket, reason: ShedReason) -> bool:
        """A queued request leaves (its client went away, or its own deadline timer fired).
        Returns False when it was no longer queued (it got a slot meanwhile: release it)."""
        if ticket.done:
            return False
        ticket.done = True  # stays in the heap; skipped when popped (O(1) removal)
        self._queued -= 1
        self.shed[reason.value] += 1
        return True

    # -- internals -----------------------------------------------------------------------

    def _take(self, ticket: Ticket, now: float) -> None:
        ticket.done = True
        ticket.admitted_at = now
        self.in_use += 1
        self.admitted += 1
        wait = now - ticket.arrived
        self.wait_count += 1
        self.wait_sum_s += wait
        self.wait_max_s = max(self.wait_max_s, wait)

    def _reject(self, ticket: Ticket, reason: ShedReason, retry_after: float) -> Decision:
        ticket.done = True
        self.shed[reason.value] += 1
        return Decision(Verdict.REJECT, ticket, reason=reason, retry_after=retry_after)
