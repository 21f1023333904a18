"""The statistics of `turnout ab report`: bootstrap percentiles and differences of medians,
the two-proportion z-test, and the sample sizes that would give those tests their power.

Pure functions of arrays and counts (numpy and the standard library); the report
(gateway/ab/report.py) decides what to feed them and how to print the answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass
class Estimate:
    """A statistic and its bootstrap confidence interval (nan when there is no data)."""

    value: float
    low: float
    high: float


@dataclass
class MedianDiff(Estimate):
    """median(b) - median(a) with its CI, and what a power calculation needs: each group's
    size and the bootstrap variance of its median."""

    var_a: float
    var_b: float
    n_a: int
    n_b: int


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


def bootstrap_median_diff(a: np.ndarray, b: np.ndarray, n_boot: int, confidence: float, rng: np.random.Generator) -> MedianDiff:
    """median(b) - median(a), with a CI from resampling each group independently."""
    if a.size == 0 or b.size == 0:
        return MedianDiff(math.nan, math.nan, math.nan, math.nan, math.nan, int(a.size), int(b.size))
    ma = np.concatenate([np.median(a[idx], axis=1) for idx in _boot_indices(rng, a.size, n_boot)])
    mb = np.concatenate([np.median(b[idx], axis=1) for idx in _boot_indices(rng, b.size, n_boot)])
    diffs = mb - ma
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return MedianDiff(float(np.median(b) - np.median(a)), float(low), float(high), float(ma.var()), float(mb.var()), int(a.size), int(b.size))


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


# ---------------------------------------------------------------------------
# Sample sizes (power)
# ---------------------------------------------------------------------------


def _z(p: float) -> float:
    return NormalDist().inv_cdf(p)


def samples_for_difference(delta: float, unit_var_a: float, unit_var_b: float, *, alpha: float, power: float) -> float:
    """Samples per group for a two-sided two-sample z-test at level `alpha` to detect a true
    difference `delta` with probability `power`, when the estimated difference has variance
    (unit_var_a + unit_var_b) / n with n per group:

        n = (z_{1-alpha/2} + z_{power})^2 * (unit_var_a + unit_var_b) / delta^2

    inf when delta is 0 (no effect: no sample size shows one); nan without data."""
    if any(math.isnan(v) for v in (delta, unit_var_a, unit_var_b)):
        return math.nan
    if delta == 0:
        return math.inf
    return (_z(1 - alpha / 2) + _z(power)) ** 2 * (unit_var_a + unit_var_b) / delta**2


def samples_for_median_diff(d: MedianDiff, *, alpha: float, power: float) -> float:
    """Samples per variant at which the observed difference of medians, were it the true one,
    would be significant with probability `power`: a normal approximation of the bootstrap
    test. Each median's variance is taken to shrink as 1/n from its bootstrap variance at
    the observed size (unit variance = n * Var*(median)); see `samples_for_difference`."""
    return samples_for_difference(d.value, d.n_a * d.var_a, d.n_b * d.var_b, alpha=alpha, power=power)


def samples_for_proportions(p_a: float, p_b: float, *, alpha: float, power: float) -> float:
    """Samples per group for the pooled two-proportion z-test (two-sided, level `alpha`) to
    tell p_a from p_b with probability `power` (Fleiss, without continuity correction):

        n = (z_{1-alpha/2} sqrt(2 pbar (1 - pbar)) + z_{power} sqrt(p_a (1 - p_a) + p_b (1 - p_b)))^2 / (p_a - p_b)^2

    with pbar = (p_a + p_b) / 2. inf when p_a == p_b; nan without data."""
    if math.isnan(p_a) or math.isnan(p_b):
        return math.nan
    if p_a == p_b:
        return math.inf
    pbar = (p_a + p_b) / 2
    root = _z(1 - alpha / 2) * math.sqrt(2 * pbar * (1 - pbar)) + _z(power) * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))
    return root**2 / (p_a - p_b) ** 2


def shows_as_zero(x: float, digits: int) -> bool:
    """Whether `x` prints as zero with `digits` decimals (as the report prints it)."""
    return float(f"{x:.{digits}f}") == 0
