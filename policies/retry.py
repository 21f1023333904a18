"""Retries: which failed attempts may be tried again, and how long to wait before each.

Pure: outcomes are an enum the gateway derives from what happened (`classify` maps the
backend errors it caught); randomness for jitter is an injected `random.Random`.

The rule from DESIGN.md: nothing is retried after bytes reached the client. Before that, a
connect error, a timeout, a 5xx or a shedding backend (503) may go to another replica or a
fallback pool; a 4xx is the request's own fault and would fail anywhere.
"""

from __future__ import annotations

import asyncio
import enum
import random
from dataclasses import dataclass, field

from backends.protocol import BackendError, Overloaded


class Outcome(enum.Enum):
    """How one attempt at a backend ended."""

    SUCCESS = "success"
    CONNECT_ERROR = "connect_error"  # never reached the upstream: always safe to resend
    TIMEOUT = "timeout"  # connect, first-token or total deadline passed
    SERVER_ERROR = "server_error"  # 5xx, or an upstream answer we could not parse
    OVERLOADED = "overloaded"  # the backend shed the request (503)
    CLIENT_ERROR = "client_error"  # 4xx: the request is wrong; another backend says the same
    CANCELLED = "cancelled"  # the client went away


RETRYABLE: frozenset[Outcome] = frozenset(
    {Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.SERVER_ERROR, Outcome.OVERLOADED}
)

# What the circuit breaker counts. A backend that sheds load (503) is alive and protecting
# itself: ejecting it would push its load onto the rest of the pool.
BACKEND_FAULTS: frozenset[Outcome] = frozenset({Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.SERVER_ERROR})

# backends.remote sets `failure` on the UpstreamErrors it raises to say what went wrong.
_FAILURE_KINDS = {
    "connect": Outcome.CONNECT_ERROR,
    "timeout": Outcome.TIMEOUT,
    "server": Outcome.SERVER_ERROR,
    "protocol": Outcome.SERVER_ERROR,
}


def classify(exc: BaseException | None) -> Outcome:
    """The outcome of an attempt that raised `exc` (None: it succeeded)."""
    if exc is None:
        return Outcome.SUCCESS
    if isinstance(exc, asyncio.CancelledError):
        return Outcome.CANCELLED
    if isinstance(exc, BackendError):
        if exc.failure in _FAILURE_KINDS:
            return _FAILURE_KINDS[exc.failure]
        if isinstance(exc, Overloaded):
            return Outcome.OVERLOADED
        if 400 <= exc.status < 500:
            return Outcome.CLIENT_ERROR
        return Outcome.SERVER_ERROR
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, ConnectionError):
        return Outcome.CONNECT_ERROR
    return Outcome.SERVER_ERROR  # a bug in a backend: another replica may not have it


def counts_against_backend(outcome: Outcome) -> bool:
    """Should this outcome count toward opening the backend's circuit?"""
    return outcome in BACKEND_FAULTS


def may_resume(outcome: Outcome) -> bool:
    """May a stream whose backend failed after bytes reached the client go on elsewhere (a
    route with `resume: true`, gateway.resume)? When the backend failed, not the request:
    a continuation sends nothing twice, so the rule above is not broken."""
    return outcome in BACKEND_FAULTS


def is_retryable(outcome: Outcome, *, first_byte_sent: bool) -> bool:
    """May an attempt that ended so be tried again? Never once the client got bytes."""
    return not first_byte_sent and outcome in RETRYABLE


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: retry n (1-based) waits up to min(max_s, base_s * multiplier**(n-1)).

    `jitter` is the fraction of that ceiling drawn at random: 0 waits exactly the ceiling,
    1 is "full jitter" (uniform in [0, ceiling)), which spreads a burst of retries best.
    """

    base_s: float = 0.05
    multiplier: float = 2.0
    max_s: float = 2.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < 0 or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("need base_s >= 0, max_s >= 0, multiplier >= 1, 0 <= jitter <= 1")

    def ceiling(self, retry: int) -> float:
        """The un-jittered delay before retry number `retry` (1-based)."""
        if retry < 1:
            raise ValueError("retry numbers start at 1")
        # Capped before exponentiating further so a large retry number cannot overflow.
        delay = self.base_s
        for _ in range(retry - 1):
            delay *= self.multiplier
            if delay >= self.max_s:
                break
        return min(delay, self.max_s)

    def delay(self, retry: int, rng: random.Random) -> float:
        """The delay before retry number `retry`, jittered with `rng`."""
        ceiling = self.ceiling(retry)
        return ceiling * (1.0 - self.jitter * rng.random())

    def schedule(self, retries: int, rng: random.Random) -> list[float]:
        """Delays before retries 1..retries."""
        return [self.delay(n, rng) for n in range(1, retries + 1)]


@dataclass(frozen=True)
class RetryPolicy:
    """A route's retry budget: up to `max_retries` further attempts after the first."""

    max_retries: int = 2
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def should_retry(self, outcome: Outcome, *, attempts_made: int, first_byte_sent: bool) -> bool:
        """After `attempts_made` attempts (>= 1), the last ending in `outcome`: try again?"""
        return attempts_made <= self.max_retries and is_retryable(outcome, first_byte_sent=first_byte_sent)
