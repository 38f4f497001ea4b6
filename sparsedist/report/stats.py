"""Across-seed statistics: mean, sample standard deviation, Student-t 95% interval, Welch's t-test
(scipy's implementations), and Holm's correction of a family of p-values.

Accuracies live in [0, 1]: `group_stats(..., bounds=ACCURACY_BOUNDS)` clips the interval to it (the
t-interval of three seeds near 1.0 otherwise reaches past 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


ACCURACY_BOUNDS = (0.0, 1.0)


@dataclass(frozen=True)
class GroupStats:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator); nan when n < 2
    ci_low: float  # 95% Student-t interval of the mean, clipped to `bounds` when given; nan when n < 2
    ci_high: float


@dataclass(frozen=True)
class WelchTest:
    t: float
    df: float  # Welch-Satterthwaite degrees of freedom
    p_value: float  # two-sided; nan when either group has n < 2 or both have zero variance


def group_stats(values: Sequence[float], confidence: float = 0.95,
                bounds: tuple[float, float] | None = None) -> GroupStats:
    """n, mean, sample std and the `confidence` Student-t interval of the mean of `values`."""
    n = len(values)
    if n == 0:
        raise ValueError("group_stats needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return GroupStats(n, mean, math.nan, math.nan, math.nan)
    from scipy import stats as scipy_stats  # here, not at import: every Tune trial imports the sweep files (0.4 s)

    std = float(scipy_stats.tstd(values))
    if std == 0:  # scipy's interval of a zero-width scale is undefined; the mean is the whole interval
        low = high = mean
    else:
        low, high = map(float, scipy_stats.t.interval(confidence, n - 1, loc=mean, scale=scipy_stats.sem(values)))
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return GroupStats(n, mean, std, low, high)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchTest:
    """Two-sided Welch's t-test of mean(a) != mean(b), without assuming equal variances."""
    from scipy import stats as scipy_stats

    if len(a) < 2 or len(b) < 2 or scipy_stats.tvar(a) + scipy_stats.tvar(b) == 0:
        return WelchTest(math.nan, math.nan, math.nan)
    result = scipy_stats.ttest_ind(a, b, equal_var=False)
    return WelchTest(float(result.statistic), float(result.df), float(result.pvalue))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (family-wise error control), in input order.

    The i-th smallest of m defined p-values becomes max over j <= i of min(1, (m - j + 1) * p_(j)); nan
    entries (tests that could not run) are not part of the family and stay nan.
    """
    defined = sorted((p, index) for index, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running_max = [math.nan] * len(p_values), 0.0
    for rank, (p, index) in enumerate(defined):
        running_max = max(running_max, min(1.0, (len(defined) - rank) * p))
        adjusted[index] = running_max
    return adjusted
