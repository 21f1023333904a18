"""Circuit breaking with time driven by the test."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.circuit import CircuitBoard, CircuitBreaker, CircuitConfig, CircuitState

CFG = CircuitConfig(failure_threshold=3, window_s=10.0, cooldown_s=30.0, probe_timeout_s=5.0)


def tripped(at: float = 100.0) -> CircuitBreaker:
    b = CircuitBreaker(CFG)
    for t in (at - 2, at - 1, at):
        b.record_failure(t)
    return b


def test_k_failures_within_the_window_open_it() -> None:
    b = CircuitBreaker(CFG)
    assert b.record_failure(0.0) is CircuitState.CLOSED
    assert b.record_failure(5.0) is CircuitState.CLOSED
    assert b.available(5.0)
    assert b.record_failure(9.9) is CircuitState.OPEN
    assert not b.available(9.9) and not b.allow(20.0)
    assert b.times_opened == 1


def test_failures_spread_beyond_the_window_do_not() -> None:
    b = CircuitBreaker(CFG)
    for t in (0.0, 6.0, 12.0, 18.0, 24.0):  # never 3 within 10s
        assert b.record_failure(t) is CircuitState.CLOSED
    assert b.available(24.0)


def test_successes_do_not_forgive_failures_in_the_window() -> None:
    b = CircuitBreaker(CFG)
    b.record_failure(0.0)
    b.record_success(0.5)
    b.record_failure(1.0)
    b.record_success(1.5)
    assert b.record_failure(2.0) is CircuitState.OPEN


def test_cooldown_then_one_probe() -> None:
    b = tripped(100.0)
    assert b.state(129.9) is CircuitState.OPEN and not b.available(129.9)
    assert b.state(130.0) is CircuitState.HALF_OPEN
    assert b.allow(130.0)  # the probe
    assert not b.available(131.0) and not b.allow(131.0)  # only one at a time


def test_probe_success_closes() -> None:
    b = tripped(100.0)
    assert b.allow(130.0)
    assert b.record_success(132.0) is CircuitState.CLOSED
    assert b.available(132.0)
    # A fresh start: it takes K new failures to open again.
    b.record_failure(133.0)
    b.record_failure(134.0)
    assert b.state(134.0) is CircuitState.CLOSED


def test_probe_failure_reopens_for_a_full_cooldown() -> None:
    b = tripped(100.0)
    assert b.allow(130.0)
    assert b.record_failure(131.0) is CircuitState.OPEN
    assert not b.available(160.9)
    assert b.state(161.0) is CircuitState.HALF_OPEN
    assert b.times_opened == 2


def test_a_lost_probe_lets_another_through_after_the_probe_timeout() -> None:
    b = tripped(100.0)
    assert b.allow(130.0)
    assert not b.available(134.9)
    assert b.allow(135.0)


def test_late_outcomes_while_open_change_nothing() -> None:
    b = tripped(100.0)
    assert b.record_success(101.0) is CircuitState.OPEN  # sent before it opened
    assert b.record_failure(102.0) is CircuitState.OPEN
    assert b.state(130.0) is CircuitState.HALF_OPEN  # the cooldown was not extended


def test_available_does_not_take_the_probe_slot_but_begin_does() -> None:
    b = tripped(100.0)
    assert b.available(130.0) and b.available(130.0)
    b.begin(130.0)
    assert not b.available(130.1)


def test_board_keeps_one_breaker_per_backend() -> None:
    board = CircuitBoard(CFG)
    for t in (1.0, 2.0, 3.0):
        board.breaker("a").record_failure(t)
    assert not board.available("a", 3.0) and board.available("b", 3.0)
    assert board.states(3.0) == {"a": CircuitState.OPEN, "b": CircuitState.CLOSED}
    assert board.breaker("a") is board.breaker("a")


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        CircuitConfig(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitConfig(window_s=0)


events = st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.sampled_from(["ok", "fail", "dispatch"])), max_size=60)


@given(events=events)
def test_never_available_while_open(events: list[tuple[float, str]]) -> None:
    b = CircuitBreaker(CFG)
    now = 0.0
    for dt, what in events:
        now += dt
        if what == "ok":
            b.record_success(now)
        elif what == "fail":
            b.record_failure(now)
        else:
            b.allow(now)
        state = b.state(now)
        if state is CircuitState.OPEN:
            assert not b.available(now)
        if state is CircuitState.CLOSED:
            assert b.available(now)
