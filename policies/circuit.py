"""Circuit breaking: a backend that fails K times within a window is ejected for a cooldown,
then probed with one request; the probe's success closes the circuit, its failure re-opens it.

Pure: every method takes `now` (monotonic seconds) from the caller, so tests drive time.
The gateway keeps one `CircuitBreaker` per backend (a `CircuitBoard`), marks replicas
`available` from `available(now)`, calls `begin(now)` on the one it dispatches to, and
reports the outcome with `record_success` / `record_failure`.

Which outcomes count as failures is the caller's decision (policies.retry.counts_against_backend):
connect errors, timeouts and 5xx do; a client's 4xx does not.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass


class CircuitState(enum.Enum):
    CLOSED = "closed"  # traffic flows; failures are counted
    OPEN = "open"  # ejected until the cooldown ends
    HALF_OPEN = "half_open"  # cooldown over: one probe may go through


@dataclass(frozen=True)
class CircuitConfig:
    """`failure_threshold` failures within `window_s` open the circuit for `cooldown_s`.

    A probe that reports nothing for `probe_timeout_s` (its task was cancelled, say) is
    presumed lost, and another probe is let through.
    """

    failure_threshold: int = 5
    window_s: float = 30.0
    cooldown_s: float = 30.0
    probe_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.window_s <= 0 or self.cooldown_s < 0 or self.probe_timeout_s <= 0:
            raise ValueError("window_s and probe_timeout_s must be > 0, cooldown_s >= 0")


class CircuitBreaker:
    """One backend's circuit."""

    def __init__(self, config: CircuitConfig | None = None) -> None:
        self.config = config or CircuitConfig()
        self._failures: deque[float] = deque()  # times of recent failures while closed
        self._opened_at: float | None = None
        self._probe_started: float | None = None  # a half-open probe in flight
        self.times_opened = 0  # for a metric

    def state(self, now: float) -> CircuitState:
        """The state at `now` (an open circuit turns half-open when its cooldown ends)."""
        if self._opened_at is None:
            return CircuitState.CLOSED
        if now - self._opened_at < self.config.cooldown_s:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def available(self, now: float) -> bool:
        """May a request be sent now? Does not take the probe slot (see `begin`)."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        return self._probe_started is None or now - self._probe_started >= self.config.probe_timeout_s

    def begin(self, now: float) -> None:
        """A request was dispatched to this backend; in half-open it is the probe."""
        if self.state(now) is CircuitState.HALF_OPEN:
            self._probe_started = now

    def allow(self, now: float) -> bool:
        """`available` and, when it is, `begin`: the check and the claim in one call."""
        if not self.available(now):
            return False
        self.begin(now)
        return True

    def record_success(self, now: float) -> CircuitState:
        """A dispatched request succeeded. Returns the state after it."""
        state = self.state(now)
        if state is CircuitState.HALF_OPEN:
            self._close()
        # While closed, a success does not forgive earlier failures: a backend failing
        # every other request must still trip K-in-a-window. While open, a late success of
        # a request sent before the circuit opened proves nothing about now.
        return self.state(now)

    def record_failure(self, now: float) -> CircuitState:
        """A dispatched request failed in a way that counts against the backend."""
        state = self.state(now)
        if state is CircuitState.HALF_OPEN:
            self._open(now)  # the probe failed: another full cooldown
        elif state is CircuitState.CLOSED:
            self._failures.append(now)
            while self._failures and now - self._failures[0] >= self.config.window_s:
                self._failures.popleft()
            if len(self._failures) >= self.config.failure_threshold:
                self._open(now)
        # OPEN: late failures of requests sent before the circuit opened change nothing.
        return self.state(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probe_started = None
        self._failures.clear()
        self.times_opened += 1

    def _close(self) -> None:
        self._opened_at = None
        self._probe_started = None
        self._failures.clear()


class CircuitBoard:
    """One breaker per backend name, created on first mention, sharing one config."""

    def __init__(self, config: CircuitConfig | None = None) -> None:
        self.config = config or CircuitConfig()
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker for `name` (new and closed when first asked for)."""
        found = self._breakers.get(name)
        if found is None:
            found = self._breakers[name] = CircuitBreaker(self.config)
        return found

    def available(self, name: str, now: float) -> bool:
        return self.breaker(name).available(now)

    def states(self, now: float) -> dict[str, CircuitState]:
        """Every known backend's state (for /metrics and the admin view)."""
        return {name: b.state(now) for name, b in self._breakers.items()}
