"""Across-seed statistics: mean, sample standard deviation, Student-t 95% interval, Welch's t-test.

The formulas are written out here (scipy supplies only the t distribution) so that tests can check
them against independent implementations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy.stats import t as student_t


@dataclass(frozen=True)
class GroupStats:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator); nan when n < 2
    ci_low: float  # 95% Student-t interval of the mean; nan when n < 2
    ci_high: float


@dataclass(frozen=True)
class WelchTest:
    t: float
    df: float  # Welch-Satterthwaite degrees of freedom
    p_value: float  # two-sided; nan when either group has n < 2 or both have zero variance


def _sample_variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def group_stats(values: Sequence[float], confidence: float = 0.95) -> GroupStats:
    """n, mean, sample std and the `confidence` Student-t interval of the mean of `values`."""
    n = len(values)
    if n == 0:
        raise ValueError("group_stats needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return GroupStats(n, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(_sample_variance(values))
    half_width = student_t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return GroupStats(n, mean, std, mean - half_width, mean + half_width)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchTest:
    """Two-sided Welch's t-test of mean(a) != mean(b), without assuming equal variances."""
    if len(a) < 2 or len(b) < 2:
        return WelchTest(math.nan, math.nan, math.nan)
    var_a, var_b = _sample_variance(a) / len(a), _sample_variance(b) / len(b)
    if var_a + var_b == 0:
        return WelchTest(math.nan, math.nan, math.nan)
    t = (sum(a) / len(a) - sum(b) / len(b)) / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    return WelchTest(t, df, 2 * student_t.sf(abs(t), df))
