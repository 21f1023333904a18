"""Routing strategies: weighted, round_robin, least_load, and the registry."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.protocol import LoadReport, Overloaded
from policies import routing
from policies.routing import (
    NoReplicaAvailable,
    ReplicaState,
    RequestFeatures,
    Strategy,
    make_strategy,
    register_strategy,
    strategy_names,
)
from policies.schema import RouteConfig

REQ = RequestFeatures(model="smollm2-135m", prompt_tokens=40, max_tokens=64)


def pool(*specs: tuple[str, float]) -> list[ReplicaState]:
    return [ReplicaState(name, weight=w) for name, w in specs]


# The strategies a policy may name (docs/configuration.md, docs/routing.md).
BUILT_IN_STRATEGIES = ["cache_aware", "kv_pressure", "least_load", "prefix_affinity", "round_robin", "weighted"]


def test_strategy_registry_holds_exactly_the_built_in_ones_and_rejects_unknown() -> None:
    assert strategy_names() == BUILT_IN_STRATEGIES
    for name in BUILT_IN_STRATEGIES:  # each constructs with its defaults, and a policy may name it
        assert make_strategy(name).name == name
        assert RouteConfig(model="m", backends=["a"], strategy=name).strategy == name
    with pytest.raises(ValueError, match="unknown routing strategy 'no_such_strategy'; known: " + ", ".join(BUILT_IN_STRATEGIES)):
        make_strategy("no_such_strategy")
    with pytest.raises(ValueError, match="strategy 'round_robin'"):
        make_strategy("round_robin", seed=1)


def test_a_new_strategy_joins_by_registering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_STRATEGIES", dict(routing._STRATEGIES))  # registered for this test only

    @register_strategy("test_first_listed")
    class FirstListed(Strategy):
        def choose(self, request: RequestFeatures, replicas: list[ReplicaState]) -> str:  # type: ignore[override]
            return replicas[0].name

    assert make_strategy("test_first_listed").choose(REQ, pool(("z", 1), ("a", 1))) == "z"
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("test_first_listed")(FirstListed)


def test_weighted_honours_weights_with_fixed_seed() -> None:
    strategy = make_strategy("weighted", seed=1234)
    replicas = pool(("a", 80), ("b", 15), ("c", 5))
    counts = Counter(strategy.choose(REQ, replicas) for _ in range(20_000))
    # Binomial sd at n=20000: a ~57, b ~50, c ~31; 5 sd of tolerance.
    assert abs(counts["a"] - 16_000) < 300
    assert abs(counts["b"] - 3_000) < 260
    assert abs(counts["c"] - 1_000) < 160


def test_weighted_is_reproducible_from_the_seed() -> None:
    replicas = pool(("a", 1), ("b", 1), ("c", 2))
    a, b = make_strategy("weighted", seed=9), make_strategy("weighted", seed=9)
    assert [a.choose(REQ, replicas) for _ in range(200)] == [b.choose(REQ, replicas) for _ in range(200)]


def test_weighted_injected_rng_decides_the_boundaries() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    replicas = pool(("a", 1), ("b", 3))  # a owns [0, 0.25), b owns [0.25, 1)
    assert make_strategy("weighted", rng=Fixed(0.0)).choose(REQ, replicas) == "a"
    assert make_strategy("weighted", rng=Fixed(0.2499)).choose(REQ, replicas) == "a"
    assert make_strategy("weighted", rng=Fixed(0.25)).choose(REQ, replicas) == "b"
    assert make_strategy("weighted", rng=Fixed(0.999999)).choose(REQ, replicas) == "b"


def test_weighted_skips_unavailable_drained_and_unhealthy() -> None:
    strategy = make_strategy("weighted", seed=0)
    replicas = [
        ReplicaState("ejected", weight=100, available=False),
        ReplicaState("drained", weight=0),
        ReplicaState("sick", weight=100, load=LoadReport(healthy=False)),
        ReplicaState("ok", weight=1, load=LoadReport(healthy=True)),
    ]
    assert {strategy.choose(REQ, replicas) for _ in range(100)} == {"ok"}


@pytest.mark.parametrize("name", ["weighted", "round_robin", "least_load"])
def test_no_eligible_replica_is_a_clear_503(name: str) -> None:
    replicas = [ReplicaState("a", available=False), ReplicaState("b", weight=0)]
    with pytest.raises(NoReplicaAvailable) as info:
        make_strategy(name).choose(REQ, replicas)
    err = info.value
    assert isinstance(err, Overloaded) and err.status == 503
    assert "smollm2-135m" in err.message and "a, b" in err.message
    assert err.body()["error"]["code"] == "no_backend_available"
    with pytest.raises(NoReplicaAvailable, match="none configured"):
        make_strategy(name).choose(REQ, [])


def test_round_robin_rotates_equal_weights() -> None:
    strategy = make_strategy("round_robin")
    replicas = pool(("a", 1), ("b", 1), ("c", 1))
    assert [strategy.choose(REQ, replicas) for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_is_smoothly_weighted() -> None:
    strategy = make_strategy("round_robin")
    replicas = pool(("a", 2), ("b", 1))
    picks = [strategy.choose(REQ, replicas) for _ in range(9)]
    assert picks == ["a", "b", "a"] * 3
    strategy = make_strategy("round_robin")
    picks = [strategy.choose(REQ, pool(("a", 5), ("b", 1), ("c", 1))) for _ in range(7)]
    # nginx's documented sequence for 5:1:1: b and c are spread into a's run, not appended.
    assert picks == ["a", "a", "b", "a", "c", "a", "a"]


def test_round_robin_skips_an_ejected_replica_and_takes_it_back() -> None:
    strategy = make_strategy("round_robin")
    up = pool(("a", 1), ("b", 1), ("c", 1))
    b_down = [ReplicaState("a"), ReplicaState("b", available=False), ReplicaState("c")]
    first = [strategy.choose(REQ, up) for _ in range(3)]
    during = [strategy.choose(REQ, b_down) for _ in range(4)]
    after = [strategy.choose(REQ, up) for _ in range(6)]
    assert first == ["a", "b", "c"]
    assert "b" not in during and Counter(during) == {"a": 2, "c": 2}
    assert Counter(after) == {"a": 2, "b": 2, "c": 2}


def test_least_load_prefers_fewest_in_flight_then_weight_then_name() -> None:
    strategy = make_strategy("least_load")
    replicas = [
        ReplicaState("c", weight=1, in_flight=2),
        ReplicaState("b", weight=1, in_flight=1),
        ReplicaState("a", weight=1, in_flight=1),
        ReplicaState("heavy", weight=5, in_flight=1),
        ReplicaState("idle-but-down", in_flight=0, available=False),
    ]
    assert strategy.choose(REQ, replicas) == "heavy"
    replicas[3].in_flight = 3
    assert strategy.choose(REQ, replicas) == "a"  # b and a tie on load and weight: by name
    replicas[2].in_flight = 9
    assert strategy.choose(REQ, replicas) == "b"


replica_lists = st.lists(
    st.builds(
        ReplicaState,
        name=st.text(alphabet="abcdefgh", min_size=1, max_size=3),
        weight=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
        in_flight=st.integers(0, 5),
        available=st.booleans(),
    ),
    max_size=6,
    unique_by=lambda r: r.name,
)


@given(replicas=replica_lists, name=st.sampled_from(["weighted", "round_robin", "least_load"]), seed=st.integers(0, 2**32))
def test_any_choice_is_an_eligible_replica_or_a_503(replicas: list[ReplicaState], name: str, seed: int) -> None:
    strategy = make_strategy(name, seed=seed) if name == "weighted" else make_strategy(name)
    eligible = {r.name for r in replicas if r.available and r.weight > 0}
    for _ in range(5):
        if not eligible:
            with pytest.raises(NoReplicaAvailable):
                strategy.choose(REQ, replicas)
        else:
            assert strategy.choose(REQ, replicas) in eligible


@given(weights=st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_round_robin_gives_exact_shares_over_one_cycle(weights: list[int]) -> None:
    strategy = make_strategy("round_robin")
    replicas = [ReplicaState(f"r{i}", weight=w) for i, w in enumerate(weights)]
    picks = Counter(strategy.choose(REQ, replicas) for _ in range(sum(weights)))
    assert picks == {f"r{i}": w for i, w in enumerate(weights)}
