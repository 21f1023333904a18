"""Retry decisions and backoff schedules."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.protocol import ContextLengthExceeded, InvalidRequest, ModelNotFound, Overloaded, UpstreamError
from policies.retry import Backoff, Outcome, RetryPolicy, classify, counts_against_backend, is_retryable, may_resume


class _Failure(UpstreamError):
    def __init__(self, failure: str) -> None:
        super().__init__("x")
        self.failure = failure


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (None, Outcome.SUCCESS),
        (_Failure("connect"), Outcome.CONNECT_ERROR),
        (_Failure("timeout"), Outcome.TIMEOUT),
        (_Failure("server"), Outcome.SERVER_ERROR),
        (_Failure("protocol"), Outcome.SERVER_ERROR),
        (UpstreamError("plain 502"), Outcome.SERVER_ERROR),
        (Overloaded("busy"), Outcome.OVERLOADED),
        (InvalidRequest("bad"), Outcome.CLIENT_ERROR),
        (ContextLengthExceeded("long"), Outcome.CLIENT_ERROR),
        (ModelNotFound("no"), Outcome.CLIENT_ERROR),
        (asyncio.CancelledError(), Outcome.CANCELLED),
        (TimeoutError(), Outcome.TIMEOUT),
        (ConnectionRefusedError(), Outcome.CONNECT_ERROR),
        (RuntimeError("bug"), Outcome.SERVER_ERROR),
    ],
)
def test_classify(exc: BaseException | None, outcome: Outcome) -> None:
    assert classify(exc) is outcome


@pytest.mark.parametrize("outcome", [Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.SERVER_ERROR, Outcome.OVERLOADED])
def test_transient_failures_retry_only_before_the_first_byte(outcome: Outcome) -> None:
    assert is_retryable(outcome, first_byte_sent=False)
    assert not is_retryable(outcome, first_byte_sent=True)


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.CLIENT_ERROR, Outcome.CANCELLED])
def test_final_outcomes_never_retry(outcome: Outcome) -> None:
    assert not is_retryable(outcome, first_byte_sent=False)


def test_what_counts_against_a_backend() -> None:
    assert {o for o in Outcome if counts_against_backend(o)} == {Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.SERVER_ERROR}


def test_only_a_backends_own_failure_may_resume_a_stream() -> None:
    assert {o for o in Outcome if may_resume(o)} == {Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.SERVER_ERROR}


def test_policy_budget() -> None:
    policy = RetryPolicy(max_retries=2)
    assert policy.should_retry(Outcome.CONNECT_ERROR, attempts_made=1, first_byte_sent=False)
    assert policy.should_retry(Outcome.CONNECT_ERROR, attempts_made=2, first_byte_sent=False)
    assert not policy.should_retry(Outcome.CONNECT_ERROR, attempts_made=3, first_byte_sent=False)
    assert not policy.should_retry(Outcome.CLIENT_ERROR, attempts_made=1, first_byte_sent=False)
    assert not policy.should_retry(Outcome.TIMEOUT, attempts_made=1, first_byte_sent=True)
    assert not RetryPolicy(max_retries=0).should_retry(Outcome.TIMEOUT, attempts_made=1, first_byte_sent=False)
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_backoff_without_jitter_is_exponential_and_capped() -> None:
    b = Backoff(base_s=0.1, multiplier=2.0, max_s=1.0, jitter=0.0)
    assert b.schedule(6, random.Random(0)) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert b.ceiling(10_000) == 1.0  # no overflow for huge retry numbers
    with pytest.raises(ValueError):
        b.ceiling(0)


def test_full_jitter_uses_the_injected_rng() -> None:
    b = Backoff(base_s=0.1, multiplier=2.0, max_s=1.0, jitter=1.0)
    draw = random.Random(42).random()
    assert b.delay(1, random.Random(42)) == pytest.approx(0.1 * (1 - draw))
    assert b.delay(3, random.Random(42)) == pytest.approx(0.4 * (1 - draw))
    assert b.schedule(5, random.Random(7)) == b.schedule(5, random.Random(7))
    assert b.schedule(5, random.Random(7)) != b.schedule(5, random.Random(8))


@given(
    retry=st.integers(1, 40),
    base=st.floats(0.001, 1.0),
    mult=st.floats(1.0, 4.0),
    cap=st.floats(0.01, 10.0),
    jitter=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_delays_stay_within_the_jitter_band(retry: int, base: float, mult: float, cap: float, jitter: float, seed: int) -> None:
    b = Backoff(base_s=base, multiplier=mult, max_s=cap, jitter=jitter)
    ceiling = b.ceiling(retry)
    assert ceiling <= cap + 1e-12
    assert ceiling == pytest.approx(min(cap, base * mult ** (retry - 1)), rel=1e-9) or ceiling == cap
    d = b.delay(retry, random.Random(seed))
    assert ceiling * (1 - jitter) - 1e-12 <= d <= ceiling + 1e-12
