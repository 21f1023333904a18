"""`turnout ab report EXPERIMENT`: per-variant latency percentiles with bootstrap confidence
intervals, error rates and tokens/s from the experiment sample log, which differences are
significant, and optionally a PNG of the distributions.

The sample log
--------------
JSON Lines, one object per finished request of an experiment, appended by the gateway
(`append_sample`); one file may hold many experiments. Fields:

    ts                 float   unix time the request finished
    experiment         str     experiment name (policy `experiments[].name`)
    variant            str     variant name that served it
    status             int     HTTP status the client got (for shadow traffic: would have got);
                               0 when the upstream never answered (connection lost, cancelled)
    ttft_s             float?  seconds from receipt to the first content byte; for a
                               non-streamed answer, to the whole answer; null on failure
    tpot_s             float?  mean seconds per output token after the first:
                               (e2e_s - ttft_s) / (completion_tokens - 1); null if < 2 tokens
    e2e_s              float   seconds from receipt to the last byte (or the failure)
    prompt_tokens      int
    completion_tokens  int
    shadow             bool    optional, default false: a mirrored request nobody waited for

Example::

    {"ts": 1718000000.5, "experiment": "runner-vs-paged", "variant": "paged", "status": 200,
     "ttft_s": 0.081, "tpot_s": 0.0123, "e2e_s": 0.87, "prompt_tokens": 34, "completion_tokens": 64}

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
Many comparisons at alpha = 0.05 will flag about one in twenty by chance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("ttft_s", "tpot_s", "e2e_s")
METRIC_TITLES = {"ttft_s": "time to first token (s)", "tpot_s": "time per output token (s)", "e2e_s": "end-to-end latency (s)"}
QUANTILES = (50, 95, 99)


def default_log_path() -> Path:
    """`$TURNOUT_HOME/experiments/samples.jsonl`, default under `~/.cache/turnout`."""
    home = os.environ.get("TURNOUT_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "turnout"
    return base / "experiments" / "samples.jsonl"


# ---------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One finished request of an experiment (see the module docstring for the fields)."""

    experiment: str
    variant: str
    status: int
    e2e_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ts: float = 0.0
    shadow: bool = False

    @property
    def ok(self) -> bool:
        return 0 < self.status < 400

    @property
    def is_error(self) -> bool:
        return self.status == 0 or self.status >= 500

    def to_json(self) -> str:
        """One log line (no newline)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Sample:
        """Parse one log object; raises ValueError/TypeError/KeyError on a malformed one."""

        def opt(name: str) -> float | None:
            value = obj.get(name)
            return None if value is None else float(value)

        return cls(
            experiment=str(obj["experiment"]),
            variant=str(obj["variant"]),
            status=int(obj["status"]),
            e2e_s=float(obj["e2e_s"]),
            ttft_s=opt("ttft_s"),
            tpot_s=opt("tpot_s"),
            prompt_tokens=int(obj.get("prompt_tokens") or 0),
            completion_tokens=int(obj.get("completion_tokens") or 0),
            ts=float(obj.get("ts") or 0.0),
            shadow=bool(obj.get("shadow", False)),
        )


def append_sample(path: Path, sample: Sample) -> None:
    """Append one sample to the log (one write of one line: concurrent appenders in one
    process do not interleave lines; the gateway should still call this off the event loop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(sample.to_json() + "\n")


def read_samples(lines: Iterable[str], experiment: str) -> tuple[list[Sample], int]:
    """The experiment's samples from log lines, and how many lines were malformed (skipped:
    a crash mid-append leaves a partial last line, which must not sink the report)."""
    samples: list[Sample] = []
    bad = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
            if obj.get("experiment") != experiment:
                continue
            samples.append(Sample.from_obj(obj))
        except (ValueError, TypeError, KeyError, AttributeError):
            bad += 1
    return samples, bad


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


@dataclass
class Estimate:
    """A statistic and its bootstrap confidence interval (nan when there is no data)."""

    value: float
    low: float
    high: float


@dataclass
class VariantStats:
    name: str
    n: int
    ok: int
    errors: int
    client_errors: int
    tokens_per_s: float
    percentiles: dict[str, dict[int, Estimate]] = field(default_factory=dict)  # metric -> q -> estimate
    values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # for plots and comparisons

    @property
    def error_rate(self) -> float:
        return self.errors / self.n if self.n else math.nan


@dataclass
class Comparison:
    """One variant against the baseline."""

    variant: str
    baseline: str
    median_diff: dict[str, Estimate]  # metric -> (variant median - baseline median) with CI
    error_rate_diff: float
    z: float
    p_value: float

    def significant_metrics(self) -> list[str]:
        """Metrics whose CI of the median difference excludes 0."""
        return [m for m, e in self.median_diff.items() if not math.isnan(e.low) and (e.low > 0 or e.high < 0)]


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


def _boot_indices(rng: np.random.Generator, n: int, n_boot: int) -> Iterable[np.ndarray]:
    """Bootstrap index matrices in batches (bounded memory for large logs)."""
    rows = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    done = 0
    while done < n_boot:
        k = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def bootstrap_percentiles(x: np.ndarray, qs: Sequence[float], n_boot: int, confidence: float, rng: np.random.Generator) -> dict[float, Estimate]:
    """Percentiles of x with percentile-bootstrap CIs (one resampling shared by all qs)."""
    if x.size == 0:
        return {q: Estimate(math.nan, math.nan, math.nan) for q in qs}
    boots = np.concatenate([np.percentile(x[idx], qs, axis=1).T for idx in _boot_indices(rng, x.size, n_boot)])
    tail = (1 - confidence) / 2 * 100
    out = {}
    for j, q in enumerate(qs):
        low, high = np.percentile(boots[:, j], [tail, 100 - tail])
        out[q] = Estimate(float(np.percentile(x, q)), float(low), float(high))
    return out


def bootstrap_median_diff(a: np.ndarray, b: np.ndarray, n_boot: int, confidence: float, rng: np.random.Generator) -> Estimate:
    """median(b) - median(a), with a CI from resampling each group independently."""
    if a.size == 0 or b.size == 0:
        return Estimate(math.nan, math.nan, math.nan)
    ma = np.concatenate([np.median(a[idx], axis=1) for idx in _boot_indices(rng, a.size, n_boot)])
    mb = np.concatenate([np.median(b[idx], axis=1) for idx in _boot_indices(rng, b.size, n_boot)])
    diffs = mb - ma
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return Estimate(float(np.median(b) - np.median(a)), float(low), float(high))


def two_proportion_z(errors_a: int, n_a: int, errors_b: int, n_b: int) -> tuple[float, float]:
    """(z, two-sided p) of a pooled two-proportion z-test for p_b - p_a. p = 1 when the
    pooled rate is 0 or 1 (no variance: nothing to tell apart)."""
    if n_a == 0 or n_b == 0:
        return math.nan, math.nan
    pooled = (errors_a + errors_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (errors_b / n_b - errors_a / n_a) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def summarize(
    samples: Sequence[Sample],
    experiment: str,
    *,
    baseline: str | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
    alpha: float = 0.05,
    seed: int = 0,
    malformed: int = 0,
) -> Report:
    """Per-variant statistics and comparisons with the baseline."""
    rng = np.random.default_rng(seed)
    by_variant: dict[str, list[Sample]] = {}
    for s in samples:
        by_variant.setdefault(s.variant, []).append(s)
    stats: list[VariantStats] = []
    for name in sorted(by_variant):
        group = by_variant[name]
        ok = [s for s in group if s.ok]
        e2e_total = sum(s.e2e_s for s in ok)
        vs = VariantStats(
            name=name,
            n=len(group),
            ok=len(ok),
            errors=sum(s.is_error for s in group),
            client_errors=sum(400 <= s.status < 500 for s in group),
            tokens_per_s=sum(s.completion_tokens for s in ok) / e2e_total if e2e_total > 0 else math.nan,
        )
        for metric in METRICS:
            x = np.array([getattr(s, metric) for s in ok if getattr(s, metric) is not None], dtype=float)
            vs.values[metric] = x
            vs.percentiles[metric] = bootstrap_percentiles(x, QUANTILES, n_boot, confidence, rng)  # type: ignore[assignment]
        stats.append(vs)

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
            comparisons.append(Comparison(vs.name, base.name, diffs, vs.error_rate - base.error_rate, z, p))
    return Report(experiment, len(samples), malformed, confidence, alpha, n_boot, stats, comparisons, baseline)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _est(e: Estimate) -> str:
    return "-" if math.isnan(e.value) else f"{e.value:.4f} [{e.low:.4f}, {e.high:.4f}]"


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
    if few:
        out += ["", "* fewer than 100 samples: p99 and its CI rest on the largest few"]
    if report.comparisons:
        out += ["", f"against baseline {report.baseline!r} (significant: {ci} CI of the median difference excludes 0; error rates: two-proportion z-test, p < {report.alpha})"]
        for c in report.comparisons:
            out.append(f"  {c.variant}:")
            for metric, d in c.median_diff.items():
                if math.isnan(d.value):
                    verdict = "no data"
                else:
                    verdict = "SIGNIFICANT" if metric in c.significant_metrics() else "not significant"
                out.append(f"    median {metric:<7} {d.value:+.4f} s [{_fmt(d.low, 4)}, {_fmt(d.high, 4)}]  {verdict}")
            if math.isnan(c.p_value):
                out.append("    error rate    no data")
            else:
                verdict = "SIGNIFICANT" if c.p_value < report.alpha else "not significant"
                out.append(f"    error rate    {c.error_rate_diff * 100:+.2f} pp  z={c.z:.2f} p={c.p_value:.4f}  {verdict}")
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
    """The `turnout ab report` options (cli.py can mount them on its own subparser)."""
    parser.add_argument("experiment", help="experiment name, as in the policy file")
    parser.add_argument("--log", type=Path, default=None, help=f"sample log (default: {default_log_path()})")
    parser.add_argument("--png", type=Path, default=None, help="also draw the distributions to this PNG file")
    parser.add_argument("--baseline", default=None, help="variant to compare the others with (default: the one with most samples)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of intervals (default 0.95)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the error-rate test (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed (default 0)")


def run(args: argparse.Namespace) -> int:
    """Print the report for parsed `args`; 0 on success, 1 when there is nothing to report,
    2 on a usage error."""
    log_path: Path = args.log or default_log_path()
    if not 0 < args.confidence < 1 or not 0 < args.alpha < 1 or args.bootstrap < 1:
        print("turnout: --confidence and --alpha must be in (0, 1), --bootstrap >= 1", file=sys.stderr)
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
            samples, args.experiment, baseline=args.baseline, n_boot=args.bootstrap, confidence=args.confidence, alpha=args.alpha, seed=args.seed, malformed=bad
        )
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
