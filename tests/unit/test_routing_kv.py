"""KV- and prefix-aware routing: kv_pressure, prefix_affinity, cache_aware, prefix hashing."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.protocol import LoadReport
from policies.routing import (
    PrefixIndex,
    ReplicaState,
    RequestFeatures,
    bounded_load_cap,
    chat_prefix_text,
    make_strategy,
    prefix_block_hashes,
    prompt_fits,
)


def kv(name: str, free: int, usage: float = 0.5, *, running: int = 0, waiting: int = 0, max_running: int = 64, in_flight: int = 0) -> ReplicaState:
    return ReplicaState(name, in_flight=in_flight, load=LoadReport(kv_usage=usage, kv_free_blocks=free, block_size=16, running=running, waiting=waiting, max_running=max_running))


# -- prefix hashes -----------------------------------------------------------------------


def test_hashes_chain_whole_prefixes_and_skip_the_partial_block() -> None:
    a = list(range(100))
    b = list(range(40)) + [999] * 60  # diverges inside block 2 (tokens 32..47)
    ha, hb = prefix_block_hashes(a, 16), prefix_block_hashes(b, 16)
    assert len(ha) == 6  # 100 // 16: the partial last block is not hashed
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    # Chained: the same block content after a different prefix hashes differently.
    assert prefix_block_hashes([7] * 32, 16)[1] != prefix_block_hashes([8] * 16 + [7] * 16, 16)[1]
    assert prefix_block_hashes(a, 16, max_blocks=3) == ha[:3]
    assert prefix_block_hashes(a + [5] * 50, 16, known=ha) == prefix_block_hashes(a + [5] * 50, 16)


def test_text_hashes_use_4_chars_per_token_and_are_stable_across_processes() -> None:
    text = chat_prefix_text([("system", "You are terse. " * 20), ("user", "hi")])
    h = prefix_block_hashes(text, 16)
    assert len(h) == len(text) // 64
    # str hash() is salted per process; ours must not be (gateways side by side must agree).
    code = "from policies.routing import prefix_block_hashes as p, chat_prefix_text as c;" "print(p(c([('system', 'You are terse. ' * 20), ('user', 'hi')]), 16))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert out == str(h)


# -- the hard rule: never a replica that cannot hold the prompt while another can ------------

replica_specs = st.lists(
    st.tuples(st.integers(0, 400), st.floats(0.0, 0.99), st.integers(0, 80), st.integers(0, 40), st.integers(0, 30)),
    min_size=1, max_size=6,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(specs=replica_specs, prompt=st.integers(1, 4000), max_tokens=st.integers(1, 2000), shared=st.integers(0, 40))
@pytest.mark.parametrize("name", ["kv_pressure", "prefix_affinity", "cache_aware"])
def test_never_a_replica_that_cannot_hold_the_prompt_while_another_can(name: str, specs: list, prompt: int, max_tokens: int, shared: int) -> None:
    replicas = [kv(f"r{i}", free, usage, running=run, waiting=wait, in_flight=inf) for i, (free, usage, run, wait, inf) in enumerate(specs)]
    strategy = make_strategy(name)
    tokens = list(range(prompt))
    request = RequestFeatures("m", prompt_tokens=prompt, max_tokens=max_tokens, prefix_hashes=prefix_block_hashes(tokens, 16))
    # Teach prefix strategies that the fullest replica served this prefix: the lure must not win.
    fullest = min(replicas, key=lambda r: r.load.kv_free_blocks)  # type: ignore[union-attr]
    if hasattr(strategy, "index"):
        strategy.index.record(fullest.name, request.prefix_hashes[: shared or None])
    chosen = strategy.choose(request, replicas)
    if any(prompt_fits(request, r) for r in replicas):
        assert prompt_fits(request, next(r for r in replicas if r.name == chosen))


def test_kv_pressure_prefers_free_kv_and_short_queues() -> None:
    s = make_strategy("kv_pressure")
    req = RequestFeatures("m", prompt_tokens=1600, max_tokens=400)  # 125 blocks
    # b has more free blocks; a has a long queue; c cannot hold the prompt at all.
    replicas = [kv("a", 5000, 0.5, waiting=60), kv("b", 3000, 0.7), kv("c", 50, 0.99)]
    assert s.choose(req, replicas) == "b"
    assert s.choose(req, [kv("a", 5000, 0.5), kv("b", 3000, 0.7)]) == "a"
    # Unknown load (no report) loses to a replica known to fit; among unknowns, fewest in flight.
    assert s.choose(req, [ReplicaState("x"), kv("b", 3000, 0.7)]) == "b"
    assert s.choose(req, [ReplicaState("x", in_flight=3), ReplicaState("y", in_flight=1)]) == "y"


def test_strategy_params_come_from_yaml_shaped_kwargs() -> None:
    s = make_strategy("cache_aware", prefix_weight=2.0, load_weight=0.5, kv_weight=0.0, load_factor=None)
    assert (s.prefix_weight, s.load_weight, s.load_factor) == (2.0, 0.5, None)
    with pytest.raises(ValueError, match="prefix_affinity.*load_factor"):
        make_strategy("prefix_affinity", load_factor=0.5)
    with pytest.raises(ValueError, match="strategy 'kv_pressure'"):
        make_strategy("kv_pressure", nonsense=1)


# -- prefix_affinity ---------------------------------------------------------------------------


def conversation(i: int, blocks: int = 20) -> tuple[int, ...]:
    return prefix_block_hashes([i] * 3 + list(range(blocks * 16)), 16)


def test_prefix_affinity_is_sticky_and_spreads_distinct_prefixes() -> None:
    s = make_strategy("prefix_affinity")
    replicas = [ReplicaState(n) for n in "abcd"]
    homes = {}
    for i in range(40):
        req = RequestFeatures("m", prompt_tokens=320, prefix_hashes=conversation(i))
        homes[i] = s.choose(req, replicas)
        # Later turns (the same prefix, longer) go to the same place, every time.
        longer = RequestFeatures("m", prompt_tokens=480, prefix_hashes=conversation(i, 30))
        assert all(s.choose(longer, replicas) == homes[i] for _ in range(3))
    assert len(set(homes.values())) == 4  # rendezvous hashing spreads distinct prefixes


def test_hot_prefix_spills_over_within_the_bounded_load() -> None:
    s = make_strategy("prefix_affinity", load_factor=1.25)
    in_flight = dict.fromkeys("abcd", 0)
    hot = RequestFeatures("m", prompt_tokens=320, prefix_hashes=conversation(7))
    for _ in range(40):  # a hot prefix arrives while nothing finishes
        replicas = [ReplicaState(n, in_flight=c) for n, c in in_flight.items()]
        in_flight[s.choose(hot, replicas)] += 1
    cap = bounded_load_cap([0] * 4, 1.25)  # sanity: the cap formula at zero load
    assert cap == 1
    assert max(in_flight.values()) <= math.ceil(1.25 * 40 / 4)
    assert min(in_flight.values()) > 0  # it spilled everywhere instead of melting one replica
    # Without the pressure (load_factor huge), it would have stayed on one replica.
    sticky = make_strategy("prefix_affinity", load_factor=1000.0)
    in_flight = dict.fromkeys("abcd", 0)
    for _ in range(40):
        in_flight[sticky.choose(hot, [ReplicaState(n, in_flight=c) for n, c in in_flight.items()])] += 1
    assert sorted(in_flight.values()) == [0, 0, 0, 40]


def test_prefix_index_is_bounded_and_evicts_tails_first() -> None:
    index = PrefixIndex(max_per_replica=10)
    h = conversation(1, 8)
    index.record("a", h)
    assert index.match("a", h) == 8
    index.record("a", conversation(2, 4))  # 12 entries > 10: two evicted, from h's tail
    assert index.size("a") == 10
    assert index.match("a", h) == 6  # the leading blocks survived


# -- cache_aware -------------------------------------------------------------------------------


def test_cache_aware_trades_overlap_against_load() -> None:
    s = make_strategy("cache_aware", load_factor=None)
    prefix = conversation(3, 40)
    s.index.record("a", prefix)
    req = RequestFeatures("m", prompt_tokens=700, max_tokens=100, prefix_hashes=prefix)
    # a holds the whole prefix and is modestly busier: the cache wins.
    assert s.choose(req, [kv("a", 5000, 0.5, running=30), kv("b", 5000, 0.5, running=10)]) == "a"
    # a is saturated (a queue of 2 x max_running): load wins.
    assert s.choose(req, [kv("a", 5000, 0.5, running=64, waiting=128), kv("b", 5000, 0.5, running=10)]) == "b"
    # A small overlap does not outweigh a real load difference.
    s2 = make_strategy("cache_aware", load_factor=None)
    s2.index.record("a", prefix[:4])
    assert s2.choose(req, [kv("a", 5000, 0.5, running=50), kv("b", 5000, 0.5, running=10)]) == "b"
    # Weights decide: with no load weight, the overlap wins even against a saturated replica.
    greedy = make_strategy("cache_aware", load_weight=0.0, kv_weight=0.0, load_factor=None)
    greedy.index.record("a", prefix)
    assert greedy.choose(req, [kv("a", 5000, 0.5, running=64, waiting=128), kv("b", 5000, 0.5)]) == "a"
