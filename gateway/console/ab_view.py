"""The A/B report (`turnout ab report`, gateway/ab/report.py) as the console shows it: the
same statistics, as JSON for the page's table and bar chart, and the same PNG of the
distributions. This module imports the tools' room gateway.ab: the console's routes import
it inside the report endpoints only, so `turnout serve` never loads it at start
(tests/unit/test_cli_tools.py). Blocking work (the log, the bootstrap, matplotlib): call
it off the event loop."""

from __future__ import annotations

import importlib.util
import io
import math
import threading
from pathlib import Path
from typing import Any

from gateway.ab.report import METRIC_TITLES, METRICS, QUANTILES, Report, plot, render_decision, render_text, summarize
from gateway.ab.stats import Estimate
from gateway.samples import read_samples

# Fewer resamples than the CLI's 2000: the console answers in about a second, and its
# intervals are still stable to the table's precision for a few thousand samples.
CONSOLE_BOOTSTRAP = 1000

_plot_lock = threading.Lock()  # matplotlib's figure machinery: one drawing at a time


def load_report(log: Path, experiment: str, baseline: str | None = None, n_boot: int = CONSOLE_BOOTSTRAP) -> Report | None:
    """The experiment's report from the sample log; None when it has no samples yet (or
    there is no log). Raises ValueError for a baseline variant without samples."""
    try:
        with log.open(encoding="utf-8") as f:
            samples, malformed = read_samples(f, experiment)
    except FileNotFoundError:
        return None
    if not samples:
        return None
    return summarize(samples, experiment, baseline=baseline, n_boot=n_boot, malformed=malformed)


def _num(x: float) -> float | None:
    """JSON has no NaN or infinity: None ("no data") instead."""
    return None if math.isnan(x) or math.isinf(x) else float(x)


def _estimate(e: Estimate) -> dict[str, float | None]:
    return {"value": _num(e.value), "low": _num(e.low), "high": _num(e.high)}


def report_json(report: Report) -> dict[str, Any]:
    """The report's numbers: per variant its counts, error rate, tokens/s and percentiles
    (with confidence intervals); per comparison with the baseline the differences, which
    are significant, and the decision lines; and the report's plain text, as the CLI prints it."""
    variants = [
        {
            "name": v.name,
            "n": v.n,
            "ok": v.ok,
            "errors": v.errors,
            "client_errors": v.client_errors,
            "error_rate": _num(v.error_rate),
            "tokens_per_s": _num(v.tokens_per_s),
            "tpot_unmeasured": v.tpot_unmeasured,
            "metrics": {
                m: {"n": int(v.values[m].size), **{f"p{q}": _estimate(v.percentiles[m][q]) for q in QUANTILES}} for m in METRICS
            },
        }
        for v in report.variants
    ]
    comparisons = []
    for c in report.comparisons:
        significant = c.significant_metrics()
        comparisons.append(
            {
                "variant": c.variant,
                "baseline": c.baseline,
                "median_diff": {m: {**_estimate(d), "significant": m in significant} for m, d in c.median_diff.items()},
                "error_rate_diff": _num(c.error_rate_diff),
                "p_value": _num(c.p_value),
                "error_rate_significant": c.error_rate_significant(report.alpha),
            }
        )
    return {
        "experiment": report.experiment,
        "samples": report.samples,
        "malformed": report.malformed,
        "confidence": report.confidence,
        "bootstrap": report.n_boot,
        "baseline": report.baseline,
        "metrics": [{"name": m, "title": METRIC_TITLES[m]} for m in METRICS],
        "quantiles": list(QUANTILES),
        "variants": variants,
        "comparisons": comparisons,
        "decision": [line for line in render_decision(report) if line],
        "text": render_text(report),
        "plot": plots_available(),
    }


def plots_available() -> bool:
    """Whether the report's PNG can be drawn: matplotlib (the `plots` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def report_png(report: Report) -> bytes:
    """The report's PNG, as `turnout ab report --png` draws it."""
    buffer = io.BytesIO()
    with _plot_lock:
        plot(report, buffer)  # type: ignore[arg-type]  # savefig takes a file object as well as a path
    return buffer.getvalue()
