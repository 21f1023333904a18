"""`turnout ab report` on a recorded sample log: the numbers match ones computed by hand."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from gateway.ab import report as ab_report
from gateway.ab import stats
from gateway.ab.report import render_text, summarize
from gateway.ab.stats import two_proportion_z
from gateway.samples import Sample, append_sample, read_samples

LOG = Path(__file__).parent / "data" / "ab_samples.jsonl"
EXPERIMENT = "runner-vs-paged"

# What tests/unit/data/ab_samples.jsonl records (successful requests of each variant).
CONTROL_TTFT = [0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.18, 0.40]
PAGED_TTFT = [0.60, 0.61, 0.62, 0.63, 0.64, 0.65, 0.66, 0.67, 0.68, 0.69]
E2E = [1.10, 1.11, 1.12, 1.13, 1.14, 1.15, 1.16, 1.17, 1.18, 1.40]  # the same for both


def pct(values: list[float], q: float) -> float:
    """Linear-interpolation percentile, by hand: rank q/100 * (n-1) between order statistics."""
    xs = sorted(values)
    rank = q / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


@pytest.fixture(scope="module")
def report() -> ab_report.Report:
    samples, bad = read_samples(LOG.read_text().splitlines(), EXPERIMENT)
    return summarize(samples, EXPERIMENT, n_boot=1000, seed=1, malformed=bad)


def test_log_reading_filters_experiment_and_skips_malformed() -> None:
    samples, bad = read_samples(LOG.read_text().splitlines(), EXPERIMENT)
    assert bad == 1  # the truncated line
    assert len(samples) == 22  # 10 + 10 successes, one 503, one 400; the other experiment's line is not ours
    assert {s.experiment for s in samples} == {EXPERIMENT}
    assert sum(s.status == 503 for s in samples) == 1


def test_counts_error_rates_and_tokens_per_second(report: ab_report.Report) -> None:
    control, paged = (next(v for v in report.variants if v.name == n) for n in ("control", "paged"))
    assert (control.n, control.ok, control.errors, control.client_errors) == (12, 10, 1, 1)
    assert (paged.n, paged.ok, paged.errors, paged.client_errors) == (10, 10, 0, 0)
    assert control.error_rate == pytest.approx(1 / 12)
    assert paged.error_rate == 0
    # Completion tokens over end-to-end seconds of the successful requests.
    assert control.tokens_per_s == pytest.approx(10 * 50 / sum(E2E))
    assert paged.tokens_per_s == pytest.approx(10 * 60 / sum(E2E))


@pytest.mark.parametrize("q", [50, 95, 99])
def test_percentiles_match_hand_computation(report: ab_report.Report, q: int) -> None:
    control, paged = (next(v for v in report.variants if v.name == n) for n in ("control", "paged"))
    assert control.percentiles["ttft_s"][q].value == pytest.approx(pct(CONTROL_TTFT, q))
    assert paged.percentiles["ttft_s"][q].value == pytest.approx(pct(PAGED_TTFT, q))
    assert control.percentiles["e2e_s"][q].value == pytest.approx(pct(E2E, q))
    # Concretely: p50 of control TTFT is the mean of the 5th and 6th values, p95 sits 55%
    # of the way from 0.18 to 0.40.
    assert pct(CONTROL_TTFT, 50) == pytest.approx(0.145) and pct(CONTROL_TTFT, 95) == pytest.approx(0.18 + 0.55 * 0.22)
    tpot = [(e - t) / 49 for e, t in zip(E2E, CONTROL_TTFT)]
    assert control.percentiles["tpot_s"][q].value == pytest.approx(pct(tpot, q), abs=1e-6)


def test_confidence_intervals_bracket_the_estimate(report: ab_report.Report) -> None:
    for v in report.variants:
        for metric in ab_report.METRICS:
            xs = v.values[metric]
            for q, est in v.percentiles[metric].items():
                # A bootstrap percentile can only take values inside the data's range.
                assert xs.min() - 1e-12 <= est.low <= est.high <= xs.max() + 1e-12
                if q != 99:  # p99 of 10 samples: its bootstrap CI need not contain it
                    assert est.low - 1e-12 <= est.value <= est.high + 1e-12


def test_significance(report: ab_report.Report) -> None:
    # The baseline is the variant with most samples: control (12).
    assert report.baseline == "control"
    (cmp,) = report.comparisons
    assert cmp.variant == "paged"
    # TTFT: every paged sample is >= 0.2s slower than every control sample but the outlier.
    ttft = cmp.median_diff["ttft_s"]
    assert ttft.value == pytest.approx(pct(PAGED_TTFT, 50) - pct(CONTROL_TTFT, 50)) == pytest.approx(0.5)
    assert ttft.low > 0
    # e2e: identical samples, so the difference is 0 and the CI straddles it.
    e2e = cmp.median_diff["e2e_s"]
    assert e2e.value == pytest.approx(0) and e2e.low <= 0 <= e2e.high
    assert "ttft_s" in cmp.significant_metrics() and "e2e_s" not in cmp.significant_metrics()
    # Error rate 1/12 vs 0/10: pooled p = 1/22.
    pooled = 1 / 22
    z = (0 - 1 / 12) / math.sqrt(pooled * (1 - pooled) * (1 / 12 + 1 / 10))
    assert cmp.z == pytest.approx(z)
    assert cmp.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    assert cmp.p_value > 0.05


def test_two_proportion_test_detects_a_real_difference() -> None:
    # 2/100 vs 10/100: pooled 0.06, se = sqrt(0.06 * 0.94 * 0.02), z = 0.08 / se ~ 2.382.
    z, p = two_proportion_z(2, 100, 10, 100)
    assert z == pytest.approx(0.08 / math.sqrt(0.06 * 0.94 * 0.02))
    assert p == pytest.approx(0.01722, abs=1e-4)
    assert two_proportion_z(0, 50, 0, 50) == (0.0, 1.0)


def test_report_is_reproducible_with_a_seed() -> None:
    samples, _ = read_samples(LOG.read_text().splitlines(), EXPERIMENT)
    a = render_text(summarize(samples, EXPERIMENT, n_boot=300, seed=7))
    b = render_text(summarize(samples, EXPERIMENT, n_boot=300, seed=7))
    assert a == b


def test_identical_distributions_are_not_significant() -> None:
    rng = random.Random(3)
    samples = [
        Sample(experiment="x", variant=v, status=200, ttft_s=t, tpot_s=0.01, e2e_s=t + 1, completion_tokens=10)
        for v in ("a", "b")
        for t in (rng.lognormvariate(-2, 0.3) for _ in range(300))
    ]
    (cmp,) = summarize(samples, "x", baseline="a", n_boot=500, seed=0).comparisons
    assert cmp.median_diff["ttft_s"].low < 0 < cmp.median_diff["ttft_s"].high
    assert cmp.significant_metrics() == []


def test_unknown_baseline_is_an_error() -> None:
    samples, _ = read_samples(LOG.read_text().splitlines(), EXPERIMENT)
    with pytest.raises(ValueError, match="nope"):
        summarize(samples, EXPERIMENT, baseline="nope")


def test_cli_prints_the_report_and_draws_the_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "ab.png"
    assert ab_report.main([EXPERIMENT, "--log", str(LOG), "--png", str(png), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "experiment runner-vs-paged: 22 samples, 2 variants (1 malformed log lines skipped)" in out
    assert "against baseline 'control'" in out
    ttft_line = next(line for line in out.splitlines() if line.strip().startswith("median ttft_s"))
    assert "+0.5000" in ttft_line and "SIGNIFICANT" in ttft_line
    control_row = next(line for line in out.splitlines() if line.startswith("control "))
    assert control_row.split()[:5] == ["control", "12", "10", "1", "8.33%"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_without_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ab_report.main(["no-such-experiment", "--log", str(LOG)]) == 1
    assert "no samples" in capsys.readouterr().err
    assert ab_report.main([EXPERIMENT, "--log", str(tmp_path / "missing.jsonl")]) == 2


def test_append_then_read_round_trips(tmp_path: Path) -> None:
    log = tmp_path / "sub" / "samples.jsonl"
    s = Sample(experiment="e", variant="v", status=200, ttft_s=0.1, tpot_s=None, e2e_s=0.5, prompt_tokens=3, completion_tokens=4, ts=1.0)
    append_sample(log, s)
    append_sample(log, s)
    samples, bad = read_samples(log.read_text().splitlines(), "e")
    assert samples == [s, s] and bad == 0


# -- TPOT: only streams and backend timings give one ------------------------------------------


def _whole_answers(variant: str, n: int, *, stream: bool | None, e2e: float = 1.0, **extra: float) -> list[Sample]:
    """Non-streamed answers as the gateway logs them: the "first byte" is the whole answer,
    so ttft is e2e less a write, and (e2e - ttft) / 49 is ~1e-5 s per token."""
    return [
        Sample(experiment="x", variant=variant, status=200, ttft_s=e2e + i * 1e-3 - 5e-4, tpot_s=5e-4 / 49, e2e_s=e2e + i * 1e-3,
               completion_tokens=50, stream=stream, **extra)  # type: ignore[arg-type]
        for i in range(n)
    ]  # fmt: skip


def test_non_streamed_answers_have_no_tpot() -> None:
    samples = _whole_answers("a", 30, stream=False) + _whole_answers("b", 30, stream=False, e2e=1.2)
    report = summarize(samples, "x", baseline="a", n_boot=200)
    for v in report.variants:
        assert v.values["tpot_s"].size == 0 and v.tpot_unmeasured == 30
        assert math.isnan(v.percentiles["tpot_s"][50].value)
    (cmp,) = report.comparisons
    assert "tpot_s" not in cmp.significant_metrics()
    text = render_text(report)
    assert "median tpot_s  +nan" not in text and "n/a for 30 of a's requests: not streamed" in text
    tpot_line = next(line for line in text.splitlines() if line.strip().startswith("median tpot_s"))
    assert tpot_line.endswith("no data")
    assert next(d for d in cmp.decisions if d.metric == "tpot_s").better is None


def test_old_log_lines_of_whole_answers_have_no_tpot() -> None:
    # Written before samples had `stream`: a tpot_s of 1e-5 s (100k tok/s) is no decode pace.
    old = _whole_answers("a", 5, stream=None)
    assert all(ab_report.tpot_of(s) is None for s in old)
    streamed = Sample(experiment="x", variant="a", status=200, ttft_s=0.1, tpot_s=0.02, e2e_s=1.08, completion_tokens=50)
    assert ab_report.tpot_of(streamed) == 0.02


def test_backend_timings_give_the_tpot_streamed_or_not() -> None:
    whole = _whole_answers("a", 1, stream=False, decode_s=0.49, output_tokens=49)[0]
    assert ab_report.tpot_of(whole) == pytest.approx(0.01)
    streamed = Sample(experiment="x", variant="a", status=200, ttft_s=0.1, tpot_s=0.02, e2e_s=1.08, completion_tokens=50,
                      stream=True, decode_s=0.245, output_tokens=49)  # fmt: skip
    assert ab_report.tpot_of(streamed) == pytest.approx(0.005)  # the backend's own, without the network
    report = summarize([whole] * 10, "x", n_boot=50)
    assert report.variants[0].values["tpot_s"] == pytest.approx([0.01] * 10)


def test_backend_timings_round_trip_through_the_log(tmp_path: Path) -> None:
    log = tmp_path / "samples.jsonl"
    s = Sample(experiment="e", variant="v", status=200, e2e_s=0.5, stream=False, decode_s=0.3, output_tokens=30)
    append_sample(log, s)
    assert read_samples(log.read_text().splitlines(), "e") == ([s], 0)


# -- significance at the printed precision --------------------------------------------------------


def test_a_difference_that_prints_as_zero_is_never_significant() -> None:
    # b is 2e-5 s slower than a, consistently: the CI excludes 0, but the table prints +0.0000.
    rng = random.Random(5)
    samples = [
        Sample(experiment="x", variant=v, status=200, ttft_s=0.1, e2e_s=1.0 + shift + rng.gauss(0, 1e-6), completion_tokens=1)
        for v, shift in (("a", 0.0), ("b", 2e-5))
        for _ in range(200)
    ]
    report = summarize(samples, "x", baseline="a", n_boot=300)
    (cmp,) = report.comparisons
    e2e = cmp.median_diff["e2e_s"]
    assert e2e.low > 0 and f"{e2e.value:+.4f}" == "+0.0000"
    assert "e2e_s" not in cmp.significant_metrics()
    line = next(line for line in render_text(report).splitlines() if line.strip().startswith("median e2e_s"))
    assert "+0.0000" in line and line.endswith("not significant")
    decision = next(d for d in cmp.decisions if d.metric == "e2e_s")
    assert decision.better is None and math.isinf(decision.needed_per_variant)


def test_an_error_rate_difference_that_prints_as_zero_is_never_significant() -> None:
    # 40,000 errors in a billion against none: p ~ 0, but the table shows +0.00 pp.
    z, p = two_proportion_z(0, 10**9, 40_000, 10**9)
    cmp = ab_report.Comparison("b", "a", {}, 40_000 / 10**9, z, p)
    assert p < 0.05 and not cmp.error_rate_significant(0.05)
    assert ab_report.Comparison("b", "a", {}, 0.08, 2.4, 0.017).error_rate_significant(0.05)


# -- the decision and its sample sizes ------------------------------------------------------------


def test_sample_size_formulas_match_hand_computation() -> None:
    z_a, z_b = 1.959964, 0.841621  # z_{0.975}, z_{0.8}
    # Two samples, effect size 1 (delta = sigma): the textbook ~16 per group.
    assert stats.samples_for_difference(1.0, 1.0, 1.0, alpha=0.05, power=0.8) == pytest.approx(2 * (z_a + z_b) ** 2, rel=1e-5)
    # Error rates 2 % vs 10 % (Fleiss, no continuity correction).
    hand = (z_a * math.sqrt(2 * 0.06 * 0.94) + z_b * math.sqrt(0.02 * 0.98 + 0.10 * 0.90)) ** 2 / 0.08**2
    assert stats.samples_for_proportions(0.02, 0.10, alpha=0.05, power=0.8) == pytest.approx(hand, rel=1e-5)
    assert math.isinf(stats.samples_for_proportions(0.1, 0.1, alpha=0.05, power=0.8))


def test_inconclusive_latency_is_sized_by_a_power_calculation() -> None:
    # b = a + 10 ms on normal data with sigma 100 ms, 400 each: not significant. The theory for
    # medians of normal data (variance pi/2 sigma^2 / n): n = (z_a + z_b)^2 * 2 * pi/2 * sigma^2 / delta^2.
    gen = np.random.default_rng(11)
    base = 1.0 + 0.1 * gen.standard_normal(400)
    samples = [Sample(experiment="x", variant="a", status=200, e2e_s=float(t)) for t in base]
    samples += [Sample(experiment="x", variant="b", status=200, e2e_s=float(t) + 0.01) for t in base]
    report = summarize(samples, "x", baseline="a", n_boot=2000, seed=3)
    (cmp,) = report.comparisons
    assert "e2e_s" not in cmp.significant_metrics()
    decision = next(d for d in cmp.decisions if d.metric == "e2e_s")
    theory = (1.959964 + 0.841621) ** 2 * 2 * (math.pi / 2) * 0.1**2 / 0.01**2  # ~2,470
    assert decision.better is None and 0.6 * theory < decision.needed_per_variant < 1.6 * theory
    assert decision.more_per_variant == math.ceil(decision.needed_per_variant) - 400
    assert f"about {decision.more_per_variant:,} more samples per variant would settle it" in render_text(report)


def test_the_report_ends_with_its_decision(report: ab_report.Report) -> None:
    lines = render_text(report).rstrip("\n").splitlines()
    tail = lines[lines.index(next(line for line in lines if line.startswith("decision"))) :]
    assert tail[1] == "  paged against control:"
    assert tail[2].split()[:4] == ["ttft_s", "control", "is", "better"]  # paged is 0.5 s slower to start
    assert tail[3].split()[:4] == ["tpot_s", "paged", "is", "better"]  # and 12 ms faster per token
    assert "e2e_s" in tail[4] and "inconclusive (+0.0000 s)" in tail[4]
    # Error rates 1/12 vs 0/10: Fleiss' n per variant, less the smaller variant's 10.
    z_a, z_b, p_a = 1.959964, 0.841621, 1 / 12
    n = (z_a * math.sqrt(2 * (p_a / 2) * (1 - p_a / 2)) + z_b * math.sqrt(p_a * (1 - p_a))) ** 2 / p_a**2
    assert f"about {math.ceil(n) - 10} more samples per variant would settle it" in tail[5]
    assert tail[-1] == "    verdict: control better on ttft_s; paged better on tpot_s; inconclusive on e2e_s, error rate"


def test_one_variant_has_nothing_to_decide() -> None:
    text = render_text(summarize(_whole_answers("a", 3, stream=True), "x", n_boot=50))
    assert text.rstrip().endswith("decision: one variant only, nothing to compare")
