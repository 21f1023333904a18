"""The Redis Lua script mirrors policies/ratelimit.py exactly: same decisions, same stored
state, same header numbers, bit for bit, on a real redis-server (time injected)."""

from __future__ import annotations

import itertools

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.ratelimit import LUA_SCRIPT, Rate, adjust, decide
from tests.conftest import RedisServer

T0 = 1_790_000_000.123456
_run = itertools.count()


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url, decode_responses=True)


def run_script(script, keys, mode, rates, costs, now, record_key=None):  # type: ignore[no-untyped-def]
    args: list[object] = [mode, "1" if record_key else "0", repr(now)]
    for rate, cost in zip(rates, costs):
        args += [repr(rate.interval), repr(rate.tau), cost]
    return script(keys=[*keys, *([record_key] if record_key else [])], args=args)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limits=st.lists(st.tuples(st.integers(1, 100_000), st.sampled_from([60.0, 10.0, 0.5])), min_size=1, max_size=4),
    ops=st.lists(
        st.tuples(st.sampled_from(["take", "take", "adjust"]), st.integers(0, 30_000), st.lists(st.integers(-50, 3000), min_size=4, max_size=4)),
        min_size=1,
        max_size=25,
    ),
)
def test_lua_matches_python(client: redis.Redis, limits: list[tuple[int, float]], ops: list) -> None:
    script = client.register_script(LUA_SCRIPT)
    run = next(_run)
    keys = [f"t{run}:b{i}" for i in range(len(limits))]
    rates = [Rate.per_minute(limit, burst) for limit, burst in limits]
    tats: list[float | None] = [None] * len(rates)
    now = T0
    for mode, dt_ms, raw in ops:
        now += dt_ms / 1000.0
        costs = raw[: len(rates)]
        out = run_script(script, keys, mode, rates, costs if mode == "adjust" else [max(0, c) for c in costs], now)
        if mode == "adjust":
            tats = [adjust(t, r, c, now) for t, r, c in zip(tats, rates, costs)]
        else:
            d = decide(tats, rates, [max(0, c) for c in costs], now)
            assert int(out[0]) == int(d.allowed)
            assert float(out[1]) == d.retry_after
            assert int(out[2]) == (0 if d.denied_by is None else d.denied_by + 1)
            for i, state in enumerate(d.buckets):
                assert int(out[3 + 2 * i]) == state.remaining
                assert float(out[4 + 2 * i]) == state.reset_after
            tats = [new if new is not None else old for new, old in zip(d.tats, tats)]
        stored = [client.get(k) for k in keys]
        for tat, value in zip(tats, stored):
            if tat is not None:
                assert value is not None and float(value) == tat


def test_revoked_or_deleted_key_is_refused_in_the_same_call(client: redis.Redis) -> None:
    script = client.register_script(LUA_SCRIPT)
    rate = Rate.per_minute(10)
    client.hset("rec", mapping={"record": "{}", "revoked": "0"})
    assert int(run_script(script, ["b"], "take", [rate], [1], T0, record_key="rec")[0]) == 1
    client.hset("rec", "revoked", "1")
    assert run_script(script, ["b"], "take", [rate], [1], T0, record_key="rec") == [-1]
    assert run_script(script, ["b"], "take", [rate], [1], T0, record_key="gone") == [-1]
    # Nothing was taken by the refused calls.
    assert float(client.get("b")) == T0 + rate.interval


def test_buckets_expire_once_full(client: redis.Redis) -> None:
    script = client.register_script(LUA_SCRIPT)
    run_script(script, ["e"], "take", [Rate.per_minute(60)], [1], T0)
    ttl_ms = client.pttl("e")
    assert 0 < ttl_ms <= 2000  # full again 1 s after T0 (+1 s of slack)
