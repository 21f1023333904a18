"""The async side of admission control: one `AdmissionController` per pool turns the pure
`policies.admission.AdmissionQueue` decisions into awaiting, waking and shedding.

    controller = AdmissionController(limit_fn=lambda: tracker.pool_capacity(pool) or 64)
    ticket = await controller.acquire("interactive", deadline_s=10)
    ...  # call the backend; when its answer is done:
    controller.release(ticket)

`acquire` raises `Overloaded` (503 + Retry-After) when the request is refused or its deadline
passes while it waits. A waiter whose task is cancelled (the client disconnected and the
route cancelled the work) leaves the queue at once and is counted as `client_gone`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from backends.protocol import Overloaded
from policies.admission import AdmissionConfig, AdmissionQueue, Priority, ShedReason, Ticket, Verdict


class AdmissionRejected(Overloaded):
    """503 from admission control, with the shed reason for logs and metrics."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float, reason: ShedReason) -> None:
        super().__init__(message, retry_after=retry_after)
        self.reason = reason


class AdmissionController:
    """One pool's concurrency limit and priority queue, for coroutines on one event loop.

    `limit_fn` is asked for the current limit at every decision, so capacity follows the
    replicas' reports (sum of max_running) or the configured figure. Metrics hooks:
    `depth`, `depth_by_priority()`, `in_use`, `shed` (a Counter by reason), `wait_sum_s` /
    `wait_count` / `wait_max_s`, and `on_wait` (called with each admitted request's wait in
    seconds: feed it to a histogram).
    """

    def __init__(
        self,
        limit_fn: Callable[[], int],
        max_queue: int = 1024,
        default_deadline_s: float = 30.0,
        *,
        config: AdmissionConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.limit_fn = limit_fn
        self.queue = AdmissionQueue(config or AdmissionConfig(max_queue=max_queue, default_deadline_s=default_deadline_s))
        self.clock = clock
        self.on_wait = on_wait
        self._waiters: dict[int, asyncio.Future[None]] = {}  # ticket.seq -> future set when admitted

    # -- metrics -------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self.queue.depth

    def depth_by_priority(self) -> dict[str, int]:
        return self.queue.depth_by_priority()

    @property
    def in_use(self) -> int:
        return self.queue.in_use

    @property
    def shed(self) -> dict[str, int]:
        return dict(self.queue.shed)

    @property
    def wait_sum_s(self) -> float:
        return self.queue.wait_sum_s

    @property
    def wait_count(self) -> int:
        return self.queue.wait_count

    @property
    def wait_max_s(self) -> float:
        return self.queue.wait_max_s

    # -- the slot ------------------------------------------------------------------------

    def _limit(self) -> int:
        return max(1, int(self.limit_fn()))

    async def acquire(self, priority: str | int | Priority = Priority.INTERACTIVE, deadline_s: float | None = None) -> Ticket:
        """Wait for a slot (or raise AdmissionRejected). Pair with `release`."""
        now = self.clock()
        decision = self.queue.offer(now, self._limit(), Priority.parse(priority), deadline_s)
        ticket = decision.ticket
        if decision.verdict is Verdict.ADMIT:
            self._observe_wait(0.0)
            return ticket
        if decision.verdict is Verdict.REJECT:
            assert decision.reason is not None and decision.retry_after is not None
            raise AdmissionRejected(_message(decision.reason), retry_after=decision.retry_after, reason=decision.reason)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[ticket.seq] = future
        self.pump()  # the limit may have grown since the last release
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, ticket.deadline - self.clock()))
        except asyncio.TimeoutError:
            self.queue.abandon(ticket, ShedReason.DEADLINE_EXPIRED)
            if ticket.admitted_at is None:
                retry = self.queue.retry_after_for(self.queue.expected_wait(self.queue.depth, self._limit()), 0.0)
                raise AdmissionRejected(_message(ShedReason.DEADLINE_EXPIRED), retry_after=retry, reason=ShedReason.DEADLINE_EXPIRED) from None
            # Handed a slot in the same instant the timer fired: take it after all.
        except asyncio.CancelledError:
            self.queue.abandon(ticket, ShedReason.CLIENT_GONE)
            if ticket.admitted_at is not None:
                # It was handed a slot just before the cancellation arrived: give it back.
                self.release(ticket)
            raise
        finally:
            self._waiters.pop(ticket.seq, None)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The request holding `ticket`'s slot is done; wake the next in line."""
        self.queue.release(ticket, self.clock())
        self.pump()

    def pump(self) -> None:
        """Give free slots to waiters (call when the limit may have grown)."""
        admitted, expired = self.queue.pump(self.clock(), self._limit())
        for t in admitted:
            self._observe_wait(t.admitted_at - t.arrived if t.admitted_at is not None else 0.0)
            fut = self._waiters.get(t.seq)
            if fut is not None and not fut.done():
                fut.set_result(None)
            elif fut is None:  # nobody waits for it any more: do not leak the slot
                self.queue.release(t, self.clock())
        for t in expired:
            fut = self._waiters.get(t.seq)
            if fut is not None and not fut.done():
                fut.set_exception(
                    AdmissionRejected(_message(ShedReason.DEADLINE_EXPIRED), retry_after=self.queue.config.min_retry_after_s, reason=ShedReason.DEADLINE_EXPIRED)
                )

    def _observe_wait(self, seconds: float) -> None:
        if self.on_wait is not None:
            self.on_wait(seconds)


def _message(reason: ShedReason) -> str:
    return {
        ShedReason.QUEUE_FULL: "The service is saturated (admission queue full); retry after the indicated time.",
        ShedReason.DEADLINE_UNMEETABLE: "The service is saturated: this request would not be started within its deadline.",
        ShedReason.DEADLINE_EXPIRED: "The service is saturated: this request waited past its deadline.",
        ShedReason.CLIENT_GONE: "The client disconnected while queued.",
    }[reason]
