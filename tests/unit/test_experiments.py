"""Experiment assignment: weights, stickiness, shadow sampling, and the config models."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from policies.experiments import (
    Experiment,
    ExperimentConfig,
    Variant,
    experiments_by_model,
    unit_hash,
    validate_experiments,
)

POLICY = """
name: runner-vs-paged
model: smollm2-135m
sticky_by: header
header: X-Session-Id
shadow_sample: 0.1
variants:
  - {name: control, backends: [local], weight: 90}
  - {name: paged, backends: [gpu-a, gpu-b], weight: 10}
  - {name: candidate, backends: [vllm], shadow: true}
"""


def experiment(weights: dict[str, float], **kw: object) -> Experiment:
    return Experiment(name="exp", model="m", variants=tuple(Variant(n, w, ("b",)) for n, w in weights.items()), **kw)  # type: ignore[arg-type]


def test_config_parses_into_the_runtime_form() -> None:
    cfg = ExperimentConfig.model_validate(yaml.safe_load(POLICY))
    exp = Experiment.from_config(cfg)
    assert [v.name for v in exp.live] == ["control", "paged"]
    assert [(v.name, v.weight, v.backends) for v in exp.shadows] == [("candidate", 0.0, ("vllm",))]
    assert exp.variants[1].backends == ("gpu-a", "gpu-b")
    assert exp.sticky_by == "header" and exp.header == "X-Session-Id" and exp.shadow_sample == 0.1


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"variants": [{"name": "a", "backends": ["x"], "shadow": True}]}, "at least one variant must take live traffic"),
        ({"variants": [{"name": "a", "backends": ["x"]}, {"name": "a", "backends": ["y"]}]}, "unique"),
        ({"variants": [{"name": "a", "backends": ["x"]}, {"name": "s", "backends": ["y"], "shadow": True, "weight": 5}]}, "shadow variant"),
        ({"sticky_by": "header", "header": None}, "needs `header:`"),
        ({"sticky_by": "user"}, "only used with sticky_by: header"),
        ({"shadow_sample": 1.5}, "less than or equal to 1"),
        ({"variants": [{"name": "a", "backends": ["x"]}], "shadow_sample": 0.2, "sticky_by": "key", "header": None}, "no variant has shadow"),
        ({"variants": [{"name": "a", "backends": ["x"], "wieght": 3}]}, "Extra inputs are not permitted"),
        ({"name": "has space"}, "should match pattern"),
    ],
)
def test_config_errors_say_what_is_wrong(patch: dict, message: str) -> None:
    data = {**yaml.safe_load(POLICY), **patch}
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.model_validate(data)


def test_cross_section_validation() -> None:
    cfg = ExperimentConfig.model_validate(yaml.safe_load(POLICY))
    backends = ["local", "gpu-a", "gpu-b", "vllm"]
    validate_experiments([cfg], backends, ["smollm2-135m"])
    with pytest.raises(ValueError, match="unknown backends \\['vllm'\\]"):
        validate_experiments([cfg], backends[:-1], ["smollm2-135m"])
    with pytest.raises(ValueError, match="no route or backend serves"):
        validate_experiments([cfg], backends, ["other"])
    twin = cfg.model_copy(update={"name": "second"})
    with pytest.raises(ValueError, match="both split model 'smollm2-135m'"):
        validate_experiments([cfg, twin], backends, ["smollm2-135m"])
    validate_experiments([cfg, twin.model_copy(update={"enabled": False})], backends, ["smollm2-135m"])
    assert list(experiments_by_model([cfg, twin.model_copy(update={"enabled": False})])) == ["smollm2-135m"]
    with pytest.raises(ValueError, match="names must be unique"):
        validate_experiments([cfg, cfg.model_copy(update={"enabled": False})], backends, ["smollm2-135m"])


def test_weights_honoured_over_many_keys() -> None:
    exp = experiment({"control": 70, "b": 20, "c": 10})
    counts = Counter(exp.assign(f"key-{i}", fallback="unused").variant.name for i in range(20_000))
    # Binomial sd at n=20000: ~65, ~57, ~42; 5 sd of tolerance.
    assert abs(counts["control"] - 14_000) < 330
    assert abs(counts["b"] - 4_000) < 290
    assert abs(counts["c"] - 2_000) < 215


def test_two_hundred_requests_with_a_fixed_seed_split_within_tolerance() -> None:
    # The acceptance shape: 200 requests, 50/50, user ids from a seeded RNG.
    rng = random.Random(20240601)
    exp = experiment({"a": 1, "b": 1})
    counts = Counter(exp.assign(f"user-{rng.getrandbits(64)}", fallback="x").variant.name for _ in range(200))
    assert abs(counts["a"] - 100) <= 25  # 3.5 sd


def test_assignment_is_sticky_and_independent_per_experiment() -> None:
    exp = experiment({"a": 1, "b": 1})
    first = {k: exp.assign(k, fallback="r1").variant.name for k in (f"u{i}" for i in range(200))}
    again = {k: exp.assign(k, fallback="r2").variant.name for k in first}
    assert first == again
    # The experiment name salts the hash: another experiment splits the same users differently.
    other = Experiment(name="exp2", model="m", variants=exp.variants)
    second = {k: other.assign(k, fallback="r").variant.name for k in first}
    agree = sum(first[k] == second[k] for k in first)
    assert 60 < agree < 140  # independent: about half agree


def test_stable_across_processes() -> None:
    # blake2b, not Python's randomised hash(): these values hold in every process.
    assert unit_hash("exp", "alice") == pytest.approx(int.from_bytes(__import__("hashlib").blake2b(b"exp\x00alice", digest_size=8).digest(), "big") / 2**64)
    assert unit_hash("ab", "c") != unit_hash("a", "bc")


def test_missing_sticky_value_falls_back_per_request() -> None:
    exp = experiment({"a": 1, "b": 1}, sticky_by="user")
    value = exp.sticky_value(api_key="k", user=None, headers={})
    assert value is None
    picks = Counter(exp.assign(value, fallback=f"req-{i}").variant.name for i in range(400))
    assert picks["a"] > 150 and picks["b"] > 150
    assert not exp.assign(None, fallback="req-1").sticky and exp.assign("u", fallback="x").sticky


def test_sticky_value_sources() -> None:
    by_key = experiment({"a": 1}, sticky_by="key")
    by_user = experiment({"a": 1}, sticky_by="user")
    by_header = experiment({"a": 1}, sticky_by="header", header="X-Session-Id")
    none = experiment({"a": 1}, sticky_by="none")
    kw = {"api_key": "key-123", "user": "alice", "headers": {"x-session-id": "s-9"}}
    assert by_key.sticky_value(**kw) == "key-123"  # type: ignore[arg-type]
    assert by_user.sticky_value(**kw) == "alice"  # type: ignore[arg-type]
    assert by_header.sticky_value(**kw) == "s-9"  # type: ignore[arg-type]
    assert none.sticky_value(**kw) is None  # type: ignore[arg-type]
    assert by_header.sticky_value(api_key=None, user=None, headers={"X-SESSION-ID": ""}) is None


def test_variant_at_boundaries() -> None:
    exp = experiment({"a": 1, "b": 3, "zero": 0})
    assert exp.variant_at(0.0).name == "a"
    assert exp.variant_at(0.2499).name == "a"
    assert exp.variant_at(0.25).name == "b"
    assert exp.variant_at(0.999999999).name == "b"
    assert "zero" not in {v.name for v in exp.live}


def test_shadow_sampling() -> None:
    exp = Experiment(name="e", model="m", variants=(Variant("live", 1, ("x",)), Variant("cand", 0, ("y",), shadow=True)), shadow_sample=0.25)
    assert exp.should_shadow(0.0) and exp.should_shadow(0.2499)
    assert not exp.should_shadow(0.25)
    rng = random.Random(5)
    hits = sum(exp.should_shadow(rng.random()) for _ in range(10_000))
    assert abs(hits - 2_500) < 220  # 5 sd
    # Reproducible per request: hash the request id.
    assert exp.should_shadow(unit_hash("e", "shadow", "req-1")) == exp.should_shadow(unit_hash("e", "shadow", "req-1"))
    no_shadows = experiment({"a": 1}, shadow_sample=1.0)
    assert not no_shadows.should_shadow(0.0)
    # Shadow variants never take live traffic.
    assert {exp.assign(f"k{i}", fallback="r").variant.name for i in range(100)} == {"live"}


@given(
    weights=st.lists(st.floats(0.01, 100, allow_nan=False), min_size=1, max_size=6),
    key=st.text(max_size=30),
)
def test_assignment_is_a_live_variant_and_deterministic(weights: list[float], key: str) -> None:
    exp = experiment({f"v{i}": w for i, w in enumerate(weights)})
    a = exp.assign(key, fallback="f").variant
    assert a in exp.live and exp.assign(key, fallback="other").variant == a


@given(u=st.floats(0, 1, exclude_max=True), weights=st.lists(st.integers(1, 10), min_size=2, max_size=5))
def test_variant_at_matches_cumulative_weights(u: float, weights: list[int]) -> None:
    exp = experiment({f"v{i}": w for i, w in enumerate(weights)})
    total, acc = sum(weights), 0
    for i, w in enumerate(weights):
        acc += w
        if u * total < acc:
            assert exp.variant_at(u).name == f"v{i}"
            break
