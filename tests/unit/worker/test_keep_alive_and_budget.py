"""The pure parts of models that come and go: keep_alive durations and the memory budget's
choice of what to unload."""

from __future__ import annotations

import pytest

from backends.protocol import ChatCompletionRequest, parse_keep_alive
from policies.residency import Resident, evictions
from policies.schema import ConfigError, parse_config


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), (0, 0.0), (-1, -1.0), ("-1", -1.0), ("-5m", -1.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("250ms", 0.25), ("2.5", 2.5), (1.5, 1.5)],
)  # fmt: skip
def test_keep_alive_durations(value: object, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["", "5 minutes", "m", "5x", True, "1h-"])
def test_bad_keep_alive_is_an_error(value: object) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(value)  # type: ignore[arg-type]


def test_a_request_keep_alive_is_validated() -> None:
    ok = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "keep_alive": "10m"})
    assert ok.keep_alive == "10m"
    with pytest.raises(ValueError, match="keep_alive"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "keep_alive": "soon"})


def test_policy_keep_alive_and_preload() -> None:
    config = parse_config("backends: [{name: a, kind: llamacpp, model: m, keep_alive: 10m, preload: true}]")
    assert config.backends[0].keep_alive_s() == 600.0 and config.backends[0].preload
    assert parse_config("backends: [{name: a, kind: paged, model: m}]").backends[0].keep_alive_s() == 300.0
    with pytest.raises(ConfigError, match="keep_alive"):
        parse_config("backends: [{name: a, kind: llamacpp, model: m, keep_alive: later}]")
    with pytest.raises(ConfigError, match="local backends"):
        parse_config("backends: [{name: a, kind: remote, model: m, url: 'http://127.0.0.1:1/v1', keep_alive: 5m}]")
    with pytest.raises(ConfigError, match="model_memory_budget_gib"):
        parse_config("server: {model_memory_budget_gib: 0}\nbackends: [{name: a, kind: paged, model: m}]")


def test_no_budget_unloads_nothing() -> None:
    assert evictions([Resident("a", 10, 1.0, False)], 10**12, None) == []


def test_least_recently_used_goes_first_and_only_as_much_as_needed() -> None:
    loaded = [Resident("old", 4, 1.0, False), Resident("mid", 4, 2.0, False), Resident("new", 4, 3.0, False)]
    assert evictions(loaded, 4, 16) == []  # 12 + 4 fits
    assert evictions(loaded, 5, 16) == ["old"]
    assert evictions(loaded, 9, 16) == ["old", "mid"]


def test_busy_models_are_never_unloaded() -> None:
    loaded = [Resident("old-busy", 4, 1.0, True), Resident("mid", 4, 2.0, False), Resident("new", 4, 3.0, False)]
    assert evictions(loaded, 5, 13) == ["mid"]
    # Even when nothing idle is left, the busy one stays (the caller loads anyway).
    assert evictions(loaded, 100, 12) == ["mid", "new"]
