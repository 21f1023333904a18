"""`turnout ab report EXPERIMENT`: per-variant latency percentiles with bootstrap confidence
intervals, error rates and tokens/s from the experiment sample log (gateway/samples.py
defines its format), which differences are significant, the decision, and optionally a PNG
of the distributions.

Metrics
-------
TTFT and end-to-end latency are the logged `ttft_s` and `e2e_s`. TPOT (time per output
token after the first) comes, per sample, from the best source it has:

1. the backend's own timings, `decode_s / output_tokens`, where the sample has them
   (streamed or not: the decode speed without the network and the gateway);
2. else the logged `tpot_s` of a streamed answer (the pace at which the client saw tokens);
3. else none: a non-streamed answer arrives whole, so the gateway's "first byte" is its end
   and (e2e - ttft) / tokens measures the write of one response (~1e-5 s/token), not
   decoding. Logs written before samples had a `stream` field: a `tpot_s` under
   `MIN_PLAUSIBLE_TPOT_S` (over 10,000 tokens/s for one stream: tokens that arrived
   together) is taken for such an answer.

Statistics
----------
Percentiles use numpy's default (linear interpolation between order statistics). Each comes
with a percentile-bootstrap confidence interval (resampling the variant's samples with
replacement, `--bootstrap` times, seeded: the same log gives the same report). Latency
percentiles are over successful requests (status < 400) only: a fast failure is not a fast
answer. Errors are statuses >= 500 or 0 (the system failed); 4xx are counted separately and
not called errors. Tokens/s per variant is sum(completion_tokens) / sum(e2e_s) over successes,
the speed one client sees, not the system's throughput.

Each variant is compared with the baseline (`--baseline`, default: the variant with most
samples): a latency difference is significant when the bootstrap CI of the difference in
medians excludes 0; an error-rate difference when a two-proportion z-test gives p < alpha.
A difference that prints as zero (4 decimals of seconds; 2 of percentage points) is never
called significant, whatever its interval: the table would contradict itself. Many
comparisons at alpha = 0.05 will flag about one in twenty by chance.

The decision
------------
The report ends with one line per metric: which variant is better (lower), or
"inconclusive" with the samples per variant that would settle it. That number is a standard
power calculation (`--power`, default 0.8) that takes the observed difference for the true
one: for latency, a two-sample z-test at level 1 - confidence with each median's variance
from its bootstrap, shrinking as 1/n (gateway.ab.stats.samples_for_median_diff); for the
error rate, the two-proportion z-test at `--alpha` (Fleiss' formula without continuity
correction, gateway.ab.stats.samples_for_proportions). A difference that prints as zero
cannot be sized: no number of samples would make the table show one.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.ab.stats import (
    Estimate,
    MedianDiff,
    bootstrap_median_diff,
    bootstrap_percentiles,
    samples_for_median_diff,
    samples_for_proportions,
    shows_as_zero,
    two_proportion_z,
)
from gateway.samples import Sample, default_log_path, read_samples

METRICS = ("ttft_s", "tpot_s", "e2e_s")
METRIC_TITLES = {"ttft_s": "time to first token (s)", "tpot_s": "time per output token (s)", "e2e_s": "end-to-end latency (s)"}
QUANTILES = (50, 95, 99)
DIFF_DIGITS = 4  # decimals of seconds in the table (and the significance floor)
RATE_DIGITS = 2  # decimals of percentage points for error rates
MIN_PLAUSIBLE_TPOT_S = 1e-4  # faster than 10k tok/s for one stream: the tokens came at once
ERROR_RATE = "error rate"


def tpot_of(sample: Sample) -> float | None:
    """The sample's time per output token, from the best source it has (module docstring:
    backend timings, else a streamed answer's `tpot_s`, else none)."""
    if sample.decode_s is not None and sample.output_tokens:
        return sample.decode_s / sample.output_tokens
    if sample.stream is False:
        return None
    if sample.stream is None and sample.tpot_s is not None and sample.tpot_s < MIN_PLAUSIBLE_TPOT_S:
        return None  # an old log line of a non-streamed answer
    return sample.tpot_s


def metric_of(sample: Sample, metric: str) -> float | None:
    """One sample's value of a METRICS name."""
    return tpot_of(sample) if metric == "tpot_s" else getattr(sample, metric)


# ---------------------------------------------------------------------------
# The report's parts
# ---------------------------------------------------------------------------


@dataclass
class VariantStats:
    name: str
    n: int
    ok: int
    errors: int
    client_errors: int
    tokens_per_s: float
    tpot_unmeasured: int = 0  # successes without a TPOT: not streamed, no backend timings
    percentiles: dict[str, dict[int, Estimate]] = field(default_factory=dict)  # metric -> q -> estimate
    values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # for plots and comparisons

    @property
    def error_rate(self) -> float:
        return self.errors / self.n if self.n else math.nan


@dataclass
class Decision:
    """What one metric says of a variant against the baseline (lower is better)."""

    metric: str  # a METRICS name or ERROR_RATE
    better: str | None  # the better variant; None: inconclusive
    difference: float  # variant - baseline: seconds, or an error-rate fraction
    needed_per_variant: float = math.nan  # inconclusive: samples per variant for the power (inf: cannot be sized)
    more_per_variant: int | None = None  # needed minus what the smaller variant has


@dataclass
class Comparison:
    """One variant against the baseline."""

    variant: str
    baseline: str
    median_diff: dict[str, MedianDiff]  # metric -> (variant median - baseline median) with CI
    error_rate_diff: float
    z: float
    p_value: float
    decisions: list[Decision] = field(default_factory=list)

    def significant_metrics(self) -> list[str]:
        """Metrics whose CI of the median difference excludes 0, and whose difference does
        not print as zero."""
        return [
            m for m, e in self.median_diff.items()
            if not math.isnan(e.low) and (e.low > 0 or e.high < 0) and not shows_as_zero(e.value, DIFF_DIGITS)
        ]  # fmt: skip

    def error_rate_significant(self, alpha: float) -> bool:
        """p < alpha, and the difference does not print as zero."""
        return not math.isnan(self.p_value) and self.p_value < alpha and not shows_as_zero(self.error_rate_diff * 100, RATE_DIGITS)


@dataclass
class Report:
    experiment: str
    samples: int
    malformed: int
    confidence: float
    alpha: float
    n_boot: int
    variants: list[VariantStats]
    comparisons: list[Comparison]
    baseline: str | None
    power: float = 0.8


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def _variant_stats(name: str, group: list[Sample], n_boot: int, confidence: float, rng: np.random.Generator) -> VariantStats:
    ok = [s for s in group if s.ok]
    e2e_total = sum(s.e2e_s for s in ok)
    vs = VariantStats(
        name=name,
        n=len(group),
        ok=len(ok),
        errors=sum(s.is_error for s in group),
        client_errors=sum(400 <= s.status < 500 for s in group),
        tokens_per_s=sum(s.completion_tokens for s in ok) / e2e_total if e2e_total > 0 else math.nan,
        tpot_unmeasured=sum(tpot_of(s) is None and s.completion_tokens >= 2 for s in ok),
    )
    for metric in METRICS:
        x = np.array([v for v in (metric_of(s, metric) for s in ok) if v is not None], dtype=float)
        vs.values[metric] = x
        vs.percentiles[metric] = bootstrap_percentiles(x, QUANTILES, n_boot, confidence, rng)  # type: ignore[assignment]
    return vs


def _more(needed: float, have: int) -> int | None:
    return None if not math.isfinite(needed) else max(0, math.ceil(needed) - have)


def decide(c: Comparison, base: VariantStats, other: VariantStats, *, confidence: float, alpha: float, power: float) -> list[Decision]:
    """Per metric: the better variant where the difference is significant, else the samples
    per variant that would make it so (module docstring: The decision)."""
    out: list[Decision] = []
    significant = c.significant_metrics()
    for metric, d in c.median_diff.items():
        if metric in significant:
            out.append(Decision(metric, c.variant if d.value < 0 else c.baseline, d.value))
            continue
        needed = math.inf if shows_as_zero(d.value, DIFF_DIGITS) else samples_for_median_diff(d, alpha=1 - confidence, power=power)
        out.append(Decision(metric, None, d.value, needed, _more(needed, min(d.n_a, d.n_b))))
    if c.error_rate_significant(alpha):
        out.append(Decision(ERROR_RATE, c.variant if c.error_rate_diff < 0 else c.baseline, c.error_rate_diff))
    else:
        if math.isnan(c.p_value) or shows_as_zero(c.error_rate_diff * 100, RATE_DIGITS):
            needed = math.nan if math.isnan(c.p_value) else math.inf
        else:
            needed = samples_for_proportions(base.error_rate, other.error_rate, alpha=alpha, power=power)
        out.append(Decision(ERROR_RATE, None, c.error_rate_diff, needed, _more(needed, min(base.n, other.n))))
    return out


def summarize(
    samples: Sequence[Sample],
    experiment: str,
    *,
    baseline: str | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
    alpha: float = 0.05,
    power: float = 0.8,
    seed: int = 0,
    malformed: int = 0,
) -> Report:
    """Per-variant statistics, comparisons with the baseline and their decisions."""
    rng = np.random.default_rng(seed)
    by_variant: dict[str, list[Sample]] = {}
    for s in samples:
        by_variant.setdefault(s.variant, []).append(s)
    stats = [_variant_stats(name, by_variant[name], n_boot, confidence, rng) for name in sorted(by_variant)]

    if baseline is None and stats:
        baseline = min(stats, key=lambda v: (-v.n, v.name)).name  # most samples; ties by name
    if baseline is not None and baseline not in by_variant:
        raise ValueError(f"baseline variant {baseline!r} has no samples; variants: {', '.join(sorted(by_variant))}")
    comparisons: list[Comparison] = []
    base = next((v for v in stats if v.name == baseline), None)
    if base is not None:
        for vs in stats:
            if vs is base:
                continue
            diffs = {m: bootstrap_median_diff(base.values[m], vs.values[m], n_boot, confidence, rng) for m in METRICS}
            z, p = two_proportion_z(base.errors, base.n, vs.errors, vs.n)
            c = Comparison(vs.name, base.name, diffs, vs.error_rate - base.error_rate, z, p)
            c.decisions = decide(c, base, vs, confidence=confidence, alpha=alpha, power=power)
            comparisons.append(c)
    return Report(experiment, len(samples), malformed, confidence, alpha, n_boot, stats, comparisons, baseline, power)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _est(e: Estimate) -> str:
    return "-" if math.isnan(e.value) else f"{e.value:.4f} [{e.low:.4f}, {e.high:.4f}]"


def _diff(d: Decision) -> str:
    if d.metric == ERROR_RATE:
        return f"{d.difference * 100:+.{RATE_DIGITS}f} pp"
    return f"{d.difference:+.{DIFF_DIGITS}f} s"


def _decision_line(d: Decision, variant: str) -> str:
    label = f"    {d.metric:<11} "
    if math.isnan(d.difference):
        return label + "no data"
    if d.better is not None:
        return label + f"{d.better} is better ({variant} {_diff(d)})"
    if math.isnan(d.needed_per_variant):
        return label + f"inconclusive ({_diff(d)}): not enough data to size"
    if math.isinf(d.needed_per_variant):
        return label + f"inconclusive ({_diff(d)}): no difference at the table's precision (a zero effect cannot be sized)"
    more = f"about {d.more_per_variant:,} more samples per variant" if d.more_per_variant else "a few more samples per variant"
    return label + f"inconclusive ({_diff(d)}): {more} would settle it (~{math.ceil(d.needed_per_variant):,} each)"


def _verdict(c: Comparison) -> str:
    better: dict[str, list[str]] = {}
    open_: list[str] = []
    for d in c.decisions:
        if d.better is not None:
            better.setdefault(d.better, []).append(d.metric)
        elif not math.isnan(d.difference):
            open_.append(d.metric)
    parts = [f"{name} better on {', '.join(ms)}" for name, ms in better.items()]
    if open_:
        parts.append(f"inconclusive on {', '.join(open_)}")
    return "; ".join(parts) or "no data to compare"


def render_decision(report: Report) -> list[str]:
    """The report's last section: per comparison and metric, the better variant, or
    "inconclusive" and the samples per variant that would settle it."""
    if not report.comparisons:
        return ["", "decision: one variant only, nothing to compare"]
    out = [
        "",
        f"decision (lower is better; sample sizes for power {report.power:g}: latency at {report.confidence:.0%} confidence, "
        f"error rate at alpha {report.alpha:g}):",
    ]
    for c in report.comparisons:
        out.append(f"  {c.variant} against {c.baseline}:")
        out += [_decision_line(d, c.variant) for d in c.decisions]
        out.append(f"    verdict: {_verdict(c)}")
    return out


def render_text(report: Report) -> str:
    """The report as plain text."""
    ci = f"{report.confidence:.0%}"
    out = [
        f"experiment {report.experiment}: {report.samples} samples, {len(report.variants)} variants"
        + (f" ({report.malformed} malformed log lines skipped)" if report.malformed else ""),
        f"percentiles over successful requests, [{ci} bootstrap CI, {report.n_boot} resamples]",
        "",
    ]
    if not report.variants:
        out.append("no samples for this experiment")
        return "\n".join(out) + "\n"
    width = max(8, *(len(v.name) for v in report.variants))
    out.append(f"{'variant':<{width}} {'n':>6} {'ok':>6} {'errors':>7} {'err rate':>9} {'4xx':>5} {'tok/s':>8}")
    for v in report.variants:
        out.append(
            f"{v.name:<{width}} {v.n:>6} {v.ok:>6} {v.errors:>7} {_fmt(v.error_rate * 100, 2) + '%':>9} {v.client_errors:>5} {_fmt(v.tokens_per_s, 1):>8}"
        )
    few = False
    for metric in METRICS:
        out += ["", METRIC_TITLES[metric]]
        header = "".join(f"  {'p' + str(q) + ' [CI]':<28}" for q in QUANTILES)
        out.append(f"  {'variant':<{width}} {'n':>6}{header}".rstrip())
        for v in report.variants:
            cells = "".join(f"  {_est(v.percentiles[metric][q]):<28}" for q in QUANTILES)
            small = " *" if 0 < v.values[metric].size < 100 else ""
            few = few or bool(small)
            out.append(f"  {v.name:<{width}} {v.values[metric].size:>6}{cells}".rstrip() + small)
        if metric == "tpot_s":
            out += [
                f"  n/a for {v.tpot_unmeasured} of {v.name}'s requests: not streamed, and no backend timings"
                for v in report.variants if v.tpot_unmeasured
            ]  # fmt: skip
    if few:
        out += ["", "* fewer than 100 samples: p99 and its CI rest on the largest few"]
    if report.comparisons:
        out += [
            "",
            f"against baseline {report.baseline!r} (significant: {ci} CI of the median difference excludes 0; error rates: "
            f"two-proportion z-test, p < {report.alpha}; never when the difference prints as zero)",
        ]
        for c in report.comparisons:
            out.append(f"  {c.variant}:")
            significant = c.significant_metrics()
            for metric, d in c.median_diff.items():
                if math.isnan(d.value):
                    out.append(f"    median {metric:<7} no data")
                    continue
                verdict = "SIGNIFICANT" if metric in significant else "not significant"
                out.append(f"    median {metric:<7} {d.value:+.{DIFF_DIGITS}f} s [{_fmt(d.low, DIFF_DIGITS)}, {_fmt(d.high, DIFF_DIGITS)}]  {verdict}")
            if math.isnan(c.p_value):
                out.append("    error rate    no data")
            else:
                verdict = "SIGNIFICANT" if c.error_rate_significant(report.alpha) else "not significant"
                out.append(f"    error rate    {c.error_rate_diff * 100:+.{RATE_DIGITS}f} pp  z={c.z:.2f} p={c.p_value:.4f}  {verdict}")
    out += render_decision(report)
    return "\n".join(out) + "\n"


def plot(report: Report, path: Path) -> None:
    """Draw each metric's distribution per variant (empirical CDFs, p50/p95 marked) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; set before any figure exists
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(METRICS), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(METRICS))
    for ax, metric in zip(axes, METRICS):
        for v in report.variants:
            x = np.sort(v.values[metric])
            if x.size == 0:
                continue
            line = ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=f"{v.name} (n={x.size})")[0]
            for q in (50, 95):
                ax.axvline(v.percentiles[metric][q].value, color=line.get_color(), linestyle=":" if q == 95 else "--", linewidth=0.8)
        ax.set_title(METRIC_TITLES[metric])
        ax.set_xlabel("seconds (dashed p50, dotted p95)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"experiment {report.experiment}")
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `turnout ab report` options."""
    parser.add_argument("experiment", help="experiment name, as in the policy file")
    parser.add_argument("--log", type=Path, default=None, help=f"sample log (default: {default_log_path()})")
    parser.add_argument("--png", type=Path, default=None, help="also draw the distributions to this PNG file")
    parser.add_argument("--baseline", default=None, help="variant to compare the others with (default: the one with most samples)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of intervals (default 0.95)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the error-rate test (default 0.05)")
    parser.add_argument("--power", type=float, default=0.8, help="power the decision's sample sizes are for (default 0.8)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed (default 0)")


def run(args: argparse.Namespace) -> int:
    """Print the report for parsed `args`; 0 on success, 1 when there is nothing to report,
    2 on a usage error."""
    log_path: Path = args.log or default_log_path()
    if not (0 < args.confidence < 1 and 0 < args.alpha < 1 and 0 < args.power < 1) or args.bootstrap < 1:
        print("turnout: --confidence, --alpha and --power must be in (0, 1), --bootstrap >= 1", file=sys.stderr)
        return 2
    try:
        with log_path.open(encoding="utf-8") as f:
            samples, bad = read_samples(f, args.experiment)
    except OSError as exc:
        print(f"turnout: cannot read the sample log: {exc}", file=sys.stderr)
        return 2
    if not samples:
        print(f"turnout: no samples for experiment {args.experiment!r} in {log_path}", file=sys.stderr)
        return 1
    try:
        report = summarize(
            samples, args.experiment, baseline=args.baseline, n_boot=args.bootstrap, confidence=args.confidence,
            alpha=args.alpha, power=args.power, seed=args.seed, malformed=bad,
        )  # fmt: skip
    except ValueError as exc:
        print(f"turnout: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_text(report))
    if args.png:
        plot(report, args.png)
        print(f"wrote {args.png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`turnout ab report EXPERIMENT [--log FILE] [--png FILE] ...` (argv after `report`)."""
    parser = argparse.ArgumentParser(prog="turnout ab report", description="Report an A/B experiment from its sample log.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
