"""The routing simulator: the engine model's prefix cache, determinism, and the headline
result (prefix-aware routing beats round_robin on hit rate on multi-turn chat)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.sim import simulator
from gateway.sim.engine import EngineCosts, SimReplica, SimRequest
from gateway.sim.simulator import ROUTE_BLOCKS, SimConfig, Simulation, run_workload
from policies.routing import prefix_block_hashes

SMALL = SimConfig(replicas=3, load=1.0, duration_s=60.0, warmup_s=15.0, seed=3)


def request(i: int, tokens: list[int], output: int) -> SimRequest:
    return SimRequest(i, 0.0, len(tokens), output, output, prefix_block_hashes(tokens + [7] * output, 16))


def run_to_end(replica: SimReplica, now: float = 0.0) -> float:
    while replica.has_work():
        now += replica.plan_step()
        replica.finish_step(now)
    return now


def test_engine_model_reuses_a_cached_prefix_and_evicts_under_pressure() -> None:
    r = SimReplica(0, EngineCosts(kv_blocks=100))
    shared = list(range(800))  # 50 blocks
    r.enqueue(request(0, shared + [1] * 100, 20))
    t1 = run_to_end(r)
    assert r.prefix_hits == 0 and r.in_use == 0
    r.enqueue(request(1, shared + [2] * 100, 20))
    t2 = run_to_end(r, t1) - t1
    assert r.prefix_hits == 800  # the 50 shared blocks came from the cache
    assert t2 < 0.7 * t1  # and their prefill was skipped
    # A different 90-block prompt needs blocks the cache holds: the LRU gives them up.
    r.enqueue(request(2, list(range(5000, 6440)), 1))
    run_to_end(r)
    assert r.cached_prefix_blocks(prefix_block_hashes(shared, 16)) < 50


def test_the_same_seed_gives_the_same_run() -> None:
    a = run_workload("multiturn", ["round_robin", "cache_aware"], SMALL, basis="nocache")
    b = run_workload("multiturn", ["round_robin", "cache_aware"], SMALL, basis="nocache")
    strip = lambda r: dataclasses.replace(r, wall_s=0.0, ttft_p99_batch=0.0)  # noqa: E731 (nan != nan: no batch here)
    assert [strip(r) for r in a.results] == [strip(r) for r in b.results]
    other = run_workload("multiturn", ["round_robin"], dataclasses.replace(SMALL, seed=4), basis="nocache")
    assert other.results[0].requests != a.results[0].requests


def test_prefix_aware_routing_beats_round_robin_on_multiturn_chat() -> None:
    run = run_workload("multiturn", ["round_robin", "least_load", "prefix_affinity", "cache_aware", "oracle"], SMALL, basis="nocache")
    by = {r.strategy: r for r in run.results}
    assert by["round_robin"].requests > 100
    for name in ("prefix_affinity", "cache_aware"):
        assert by[name].prefix_hit_rate > by["round_robin"].prefix_hit_rate + 0.1, name
        assert by[name].prefix_hit_rate > by["least_load"].prefix_hit_rate + 0.1, name
        assert by[name].ttft_p50 < by["round_robin"].ttft_p50, name
    # The router's own picture of the caches is nearly as good as knowing them.
    assert by["cache_aware"].prefix_hit_rate >= 0.9 * by["oracle"].prefix_hit_rate
    # Round robin spreads requests evenly; every strategy serves every request here.
    assert max(by["round_robin"].per_replica_requests) - min(by["round_robin"].per_replica_requests) <= 1
    assert all(r.shed_rate == 0 and r.completed == r.requests for r in run.results)


def test_main_prints_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--workload", "poisson", "--strategy", "round_robin", "--strategy", "kv_pressure", "--replicas", "2",
            "--duration", "20", "--warmup", "5", "--load-basis", "nocache", "--out", str(tmp_path), "--jobs", "1"]  # fmt: skip
    assert simulator.main(argv) == 0
    out = capsys.readouterr().out
    assert "round_robin" in out and "kv_pressure" in out and "ttft p99" in out
    png = tmp_path / "sim-poisson.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert simulator.main(["--strategy", "no_such_strategy", "--no-plot"]) == 2


def test_the_router_hashes_at_most_route_blocks() -> None:
    # The default is what the published figures used (512), not the gateway's default (64).
    assert SimConfig().route_blocks == ROUTE_BLOCKS == 512
    long_prompt = request(0, list(range(160 * 16)), 4)  # 160 full blocks
    seen: list[int] = []
    for blocks in (ROUTE_BLOCKS, 64):
        sim = Simulation(dataclasses.replace(SMALL, route_blocks=blocks), [long_prompt], "cache_aware")
        choose = sim.strategy.choose
        sim.strategy.choose = lambda features, states: seen.append(len(features.prefix_hashes)) or choose(features, states)  # type: ignore[method-assign]
        sim._dispatch(sim.requests[0], sim.admission.offer(0.0, 4, simulator.Priority(0), 30.0).ticket)
        assert sim.strategy.max_blocks == blocks
    assert seen == [160, 64]
