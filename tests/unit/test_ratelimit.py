"""policies/ratelimit.py: GCRA decisions against a reference token bucket in exact arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.ratelimit import Rate, adjust, decide

T0 = 1_790_000_000.0  # wall-clock magnitude: the Redis script works on epoch seconds
TOL_S = 1e-5  # decisions within this many seconds of the boundary may go either way


class ReferenceBucket:
    """The textbook token bucket: a level that refills continuously up to a capacity."""

    def __init__(self, limit: int, burst_seconds: float, now: float) -> None:
        self.rate = Fraction(limit, 60)  # units per second
        self.capacity = max(Fraction(1), Fraction(limit) * Fraction(burst_seconds) / 60)
        self.level = self.capacity
        self.last = Fraction(now)

    def refill(self, now: float) -> None:
        t = Fraction(now)
        self.level = min(self.capacity, self.level + (t - self.last) * self.rate)
        self.last = t

    def seconds(self, units: Fraction) -> float:
        return float(units / self.rate)


op = st.tuples(
    st.sampled_from(["take", "take", "take", "adjust"]),
    st.integers(min_value=0, max_value=20_000),  # ms since the previous operation
    st.lists(st.integers(min_value=-40, max_value=120), min_size=2, max_size=2),  # costs / deltas
)


@settings(max_examples=300, deadline=None)
@given(
    limits=st.lists(
        st.tuples(st.integers(min_value=1, max_value=6000), st.sampled_from([60.0, 30.0, 7.5, 1.0, 0.25])),
        min_size=1,
        max_size=2,
    ),
    ops=st.lists(op, min_size=1, max_size=40),
)
def test_gcra_matches_a_reference_token_bucket(limits: list[tuple[int, float]], ops: list) -> None:
    rates = [Rate.per_minute(limit, burst) for limit, burst in limits]
    refs = [ReferenceBucket(limit, burst, T0) for limit, burst in limits]
    tats: list[float | None] = [None] * len(rates)
    now = T0
    for kind, dt_ms, raw in ops:
        now += dt_ms / 1000.0
        for ref in refs:
            ref.refill(now)
        if kind == "adjust":
            deltas = raw[: len(rates)]
            tats = [adjust(t, r, d, now) for t, r, d in zip(tats, rates, deltas)]
            for ref, d in zip(refs, deltas):
                ref.level = min(ref.capacity, ref.level - d)
            continue
        costs = [max(0, c) for c in raw[: len(rates)]]
        d = decide(tats, rates, costs, now)
        # The reference's answer, and whether it is too close to the boundary to call.
        margins = [ref.level - c for ref, c in zip(refs, costs) if c > 0]
        margin_s = [ref.seconds(ref.level - c) for ref, c in zip(refs, costs) if c > 0]
        clear_deny = any(m < 0 and abs(s) > TOL_S for m, s in zip(margins, margin_s))
        ambiguous = not clear_deny and any(abs(s) <= TOL_S for s in margin_s)
        if not ambiguous:
            assert d.allowed == (not clear_deny), (d, [float(m) for m in margins])
        if d.allowed:
            for ref, c in zip(refs, costs):
                ref.level -= c
            assert d.retry_after == 0
        else:
            expected = max(ref.seconds(c - ref.level) for ref, c in zip(refs, costs) if c > 0 and ref.level < c)
            assert d.retry_after == pytest.approx(expected, abs=TOL_S)
        tats = [new if new is not None else old for new, old in zip(d.tats, tats)]
        for ref, state in zip(refs, d.buckets):
            expected_remaining = max(0, math.floor(ref.level))
            near_integer = ref.seconds(abs(ref.level - round(ref.level))) <= TOL_S
            assert abs(state.remaining - expected_remaining) <= (1 if near_integer else 0)
            assert state.reset_after == pytest.approx(ref.seconds(ref.capacity - ref.level), abs=TOL_S)


def test_exactly_the_limit_passes_then_refills_on_schedule() -> None:
    rpm = Rate.per_minute(5)  # burst: the whole minute
    tats: list[float | None] = [None]
    passed = 0
    for _ in range(8):
        d = decide(tats, [rpm], [1], T0)
        if d.allowed:
            passed += 1
            tats = list(d.tats)
    assert passed == 5
    d = decide(tats, [rpm], [1], T0)
    assert not d.allowed and d.retry_after == pytest.approx(12.0) and d.buckets[0].remaining == 0
    assert not decide(tats, [rpm], [1], T0 + 11.9).allowed
    later = decide(tats, [rpm], [1], T0 + 12.0)
    assert later.allowed and later.buckets[0].remaining == 0
    assert later.buckets[0].reset_after == pytest.approx(60.0)


def test_burst_seconds_bounds_the_burst() -> None:
    rate = Rate.per_minute(60, burst_seconds=2)  # 1 per second, at most 2 at once
    assert rate.capacity == pytest.approx(2)
    tats: list[float | None] = [None]
    results = []
    for _ in range(3):
        d = decide(tats, [rate], [1], T0)
        results.append(d.allowed)
        if d.allowed:
            tats = list(d.tats)
    assert results == [True, True, False]
    assert decide(tats, [rate], [1], T0 + 1.0).allowed


def test_all_or_nothing_across_buckets_and_the_tighter_wins() -> None:
    key, tenant = Rate.per_minute(10), Rate.per_minute(2)
    tats: list[float | None] = [None, None]
    for _ in range(2):
        d = decide(tats, [key, tenant], [1, 1], T0)
        assert d.allowed
        tats = list(d.tats)
    d = decide(tats, [key, tenant], [1, 1], T0)
    assert not d.allowed and d.denied_by == 1
    assert d.tats == (None, None)  # the key's bucket was not charged for the refusal
    assert [s.remaining for s in d.buckets] == [8, 0]


def test_peek_never_denies_nor_takes() -> None:
    rate = Rate.per_minute(1)
    d = decide([None], [rate], [1], T0)
    tats = list(d.tats)
    peek = decide(tats, [rate], [0], T0)
    assert peek.allowed and peek.tats == (None,) and peek.buckets[0].remaining == 0


def test_reconciliation_refunds_and_charges() -> None:
    tpm = Rate.per_minute(600)  # 10 tokens/s, capacity 600
    d = decide([None], [tpm], [500], T0)  # reserve 500
    tat = d.tats[0]
    tat = adjust(tat, tpm, 120 - 500, T0)  # used 120: refund 380
    assert decide([tat], [tpm], [0], T0).buckets[0].remaining == 480
    tat = adjust(tat, tpm, 1000, T0)  # a surprise overage: into debt
    d = decide([tat], [tpm], [1], T0)
    assert not d.allowed and d.retry_after == pytest.approx((520 + 1) / 10)
    # A refund never fills a bucket past its capacity.
    assert adjust(None, tpm, -10_000, T0) == T0


def test_rate_validation() -> None:
    with pytest.raises(ValueError):
        Rate.per_minute(0)
    assert Rate.per_minute(3, burst_seconds=1).capacity == pytest.approx(1)  # never below one unit
