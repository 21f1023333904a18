"""gateway.bench.serve_vs_offline's level profile: engine counters diffed between two
/metrics pages (hand-written Prometheus text)."""

from __future__ import annotations

import pytest

from gateway.bench.serve_vs_offline import engine_counters, level_profile, offline_steps, profile_line


def page(steps: float, step_s: float, decode: float, prefill: float, idle_s: float, deliver_s: float, drain_s: float,
         loop_s: float | None) -> str:  # fmt: skip
    """A /metrics page as the gateway writes it; the decode tokens split over two label sets
    (summed), and a gauge and another counter that the profile ignores."""
    counters = {
        "turnout:paged_steps": steps, "turnout:paged_step_seconds": step_s, "turnout:paged_prefill_tokens": prefill,
        "turnout:paged_graph_steps": steps / 2, "turnout:paged_idle_seconds": idle_s,
        "turnout:paged_deliver_seconds": deliver_s, "turnout:paged_drain_seconds": drain_s, "vllm:generation_tokens": 7.0,
    }  # fmt: skip
    if loop_s is not None:
        counters["turnout:paged_loop_seconds"] = loop_s
    lines = ['# HELP vllm:kv_cache_usage_perc KV-cache usage.', "# TYPE vllm:kv_cache_usage_perc gauge",
             'vllm:kv_cache_usage_perc{backend="gpu",model_name="m"} 0.5']  # fmt: skip
    for name, value in counters.items():
        lines += [f"# HELP {name} x.", f"# TYPE {name} counter", f'{name}_total{{backend="gpu",model_name="m"}} {value}']
    lines += ["# HELP turnout:paged_decode_tokens x.", "# TYPE turnout:paged_decode_tokens counter",
              f'turnout:paged_decode_tokens_total{{backend="gpu",model_name="m"}} {decode - 1}',
              'turnout:paged_decode_tokens_total{backend="other",model_name="m"} 1.0']  # fmt: skip
    return "\n".join(lines) + "\n"


def test_counters_are_summed_over_labels_and_missing_ones_are_zero() -> None:
    got = engine_counters(page(10, 1.0, 50, 8, 2.0, 0.1, 0.05, None))
    assert got["decode_tokens"] == 50 and got["steps"] == 10 and got["idle_s"] == 2.0
    assert got["loop_s"] == 0.0


def test_level_profile_from_two_pages() -> None:
    before = page(100, 1.0, 1_000, 500, 5.0, 0.1, 0.01, 10.0)
    # 1000 steps in 10.5 s of the engine thread's wall: 8 s in steps, 1 s delivering, 0.2 s
    # draining, 1 s idle, 0.3 s the rest.
    after = page(1_100, 9.0, 251_000, 66_036, 6.0, 1.1, 0.21, 20.5)
    p = level_profile(before, after, wall_s=11.0)
    assert p["steps"] == 1_000 and p["graph_steps"] == 500
    assert p["step_ms"] == pytest.approx(8.0)
    assert p["deliver_ms_per_step"] == pytest.approx(1.0)
    assert p["drain_ms_per_step"] == pytest.approx(0.2)
    assert p["other_ms_per_step"] == pytest.approx(0.3)
    assert p["active_ms_per_step"] == pytest.approx(9.5)  # the engine thread's wall less idle, per step
    assert p["decode_tokens_per_step"] == pytest.approx(250.0)
    assert p["prefill_tokens"] == 65_536
    assert p["wall_s"] == 11.0 and p["engine_wall_s"] == pytest.approx(10.5) and p["idle_s"] == pytest.approx(1.0)
    # Fractions of the engine thread's own wall (not of the scrape window's 11 s).
    assert p["busy"] == pytest.approx(8.0 / 10.5)
    assert p["deliver"] == pytest.approx(1.0 / 10.5)
    assert p["drain"] == pytest.approx(0.2 / 10.5)
    assert p["idle"] == pytest.approx(1.0 / 10.5)
    assert p["other"] == pytest.approx(0.3 / 10.5)
    line = profile_line("stream", p, offline_steps({"steps": 1_000, "duration_s": 7.5, "decode_step_ms": {"mean": 7.2},
                                                    "decode_batch_mean": 255.0}))  # fmt: skip
    assert "active 9.50 ms/step (offline 7.50 wall/step, 7.20 decode step) = step 8.00 (GPU wait 0.00) + deliver 1.000" in line
    assert "250.0 decode tok/step (offline 255.0)" in line and "busy 76%" in line and "other 3%" in line


def test_without_the_loop_counter_the_fractions_are_of_the_scrape_wall() -> None:
    before = page(0, 0.0, 0, 0, 0.0, 0.0, 0.0, None)
    after = page(100, 1.0, 2_000, 100, 0.5, 0.25, 0.0, None)
    p = level_profile(before, after, wall_s=2.0)
    assert p["engine_wall_s"] == 0.0
    assert (p["busy"], p["deliver"], p["idle"], p["other"]) == pytest.approx((0.5, 0.125, 0.25, 0.125))
    assert p["active_ms_per_step"] == pytest.approx(15.0)


def test_an_idle_level_has_no_per_step_figures() -> None:
    same = page(5, 0.5, 10, 10, 1.0, 0.1, 0.1, 3.0)
    p = level_profile(same, same, wall_s=0.0)
    assert p["steps"] == 0 and p["step_ms"] == 0.0 and p["decode_tokens_per_step"] == 0.0 and p["busy"] == 0.0


def test_the_gateway_page_reads_back() -> None:
    """What gateway.metrics writes for a backend's stats() is what the profile reads."""
    from types import SimpleNamespace

    from backends.protocol import LoadReport
    from gateway.metrics import build_metrics_registry, exposition

    class Backend:
        def load(self) -> LoadReport:
            return LoadReport()

        def stats(self) -> dict[str, float]:
            return {"turnout:paged_steps": 3.0, "turnout:paged_step_seconds": 0.25, "turnout:paged_loop_seconds": 2.0}

    registry, load = build_metrics_registry(SimpleNamespace(backends={"gpu": Backend()}, started=False))  # type: ignore[arg-type]
    got = engine_counters(exposition(registry, load).decode())
    assert (got["steps"], got["step_s"], got["loop_s"], got["idle_s"]) == (3.0, 0.25, 2.0, 0.0)


def test_repeats_are_summarized_by_medians_and_paired_ratios() -> None:
    from gateway.bench.serve_vs_offline import summarize

    def row(workers: int, offline: float, stream: float, whole: float) -> dict[str, float | int | str]:
        return {"shape": "s", "workers": workers, "offline": offline, "stream": stream, "whole": whole}

    # Offline drifts 2x between repeats; each repeat's served figure drifts with it.
    rows = [row(1, 40_000, 38_000, 39_000), row(4, 40_000, 30_000, 35_000), row(1, 90_000, 86_000, 88_000),
            row(4, 90_000, 80_000, 85_000), row(1, 60_000, 57_000, 60_000), row(4, 60_000, 54_000, 60_000)]  # fmt: skip
    one, four = summarize(rows)
    assert (one["workers"], one["repeats"], one["offline"], one["stream"], one["whole"]) == (1, 3, 60_000, 57_000, 60_000)
    # The median of the pairs' ratios, not the ratio of the medians.
    assert one["stream_ratio"] == pytest.approx(0.95) and one["stream_ratio_min"] == pytest.approx(0.95)
    assert one["whole_ratio"] == pytest.approx(88 / 90) and one["whole_ratio_max"] == pytest.approx(1.0)
    assert four["stream_ratio"] == pytest.approx(80 / 90) and four["stream_ratio_min"] == pytest.approx(0.75)
    assert four["whole_ratio_min"] == pytest.approx(35 / 40)


def test_each_level_draws_prompts_no_other_level_drew(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A prompt repeated from an earlier level would be served from the prefix cache, a
    prefill the offline run pays for: each level's generators get seeds of their own."""
    import argparse
    import json

    from gateway.bench import serve_vs_offline
    from gateway.bench.serve import synthetic_prompts

    seeds: list[list[int]] = []

    class Generator:
        def __init__(self, cmd: list[str], cwd: object) -> None:
            seeds[-1].append(int(cmd[cmd.index("--seed") + 1]))
            report = cmd[cmd.index("--json") + 1]
            level = {"duration_s": 1.0, "output_tokens_per_s": 10.0}
            with open(report, "w") as f:
                json.dump({"levels": [level]}, f)

        def wait(self, timeout: float) -> int:
            self.returncode = 0
            return 0

    monkeypatch.setattr(serve_vs_offline.subprocess, "Popen", Generator)
    args = argparse.Namespace(concurrency=8, clients=2, rounds=1, output_len=4, input_len=64)
    for level in range(3):  # the warm-up round, then the two measured levels, as served() runs them
        seeds.append([])
        assert serve_vs_offline.load("http://127.0.0.1:1/v1", False, args, tmp_path / f"l{level}", seed_base=level * args.clients) == 20.0
    assert seeds == [[0, 1], [2, 3], [4, 5]]
    prompts = [{p.prompt for p in synthetic_prompts(8, 16, seed)} for level in seeds for seed in level]
    assert sum(map(len, prompts)) == len(set().union(*prompts))  # no prompt drawn twice
