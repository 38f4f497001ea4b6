import math

import pytest
from scipy import stats as scipy_stats

from sparsedist.report.stats import ACCURACY_BOUNDS, group_stats, holm, welch_t_test


def test_group_stats_match_hand_arithmetic():
    # 1..5: mean 3, sample variance 10/4 = 2.5; t(0.975, df=4) = 2.776445 (t table);
    # half width 2.776445 * sqrt(2.5) / sqrt(5) = 2.776445 * 0.7071068 = 1.963243.
    result = group_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert result.n == 5
    assert result.mean == pytest.approx(3.0)
    assert result.std == pytest.approx(math.sqrt(2.5))
    assert result.ci_low == pytest.approx(3.0 - 1.963243, abs=1e-5)
    assert result.ci_high == pytest.approx(3.0 + 1.963243, abs=1e-5)


def test_group_stats_interval_matches_scipy_t_interval():
    values = [0.861, 0.874, 0.869, 0.880]
    result = group_stats(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=scipy_stats.tmean(values), scale=scipy_stats.sem(values))
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), rel=1e-12)
    assert result.std == pytest.approx(scipy_stats.tstd(values), rel=1e-12)


def test_single_value_group_has_mean_but_no_spread():
    result = group_stats([0.87])
    assert (result.n, result.mean) == (1, 0.87)
    assert math.isnan(result.std) and math.isnan(result.ci_low) and math.isnan(result.ci_high)


def test_empty_group_is_an_error():
    with pytest.raises(ValueError):
        group_stats([])


def test_welch_matches_hand_arithmetic():
    # a: mean 2, var 1 (n 3) -> var/n = 1/3; b: mean 5, var 4 (n 3) -> 4/3. t = -3 / sqrt(5/3) = -2.32379;
    # df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 2.77778 / 0.94444 = 2.94118.
    result = welch_t_test([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert result.t == pytest.approx(-2.32379, abs=1e-5)
    assert result.df == pytest.approx(2.94118, abs=1e-5)
    assert result.p_value == pytest.approx(2 * scipy_stats.t.sf(2.32379, 2.94118), abs=1e-5)


@pytest.mark.parametrize("a, b", [
    ([0.8797, 0.8751, 0.8822, 0.8790], [0.869, 0.8655, 0.8712]),
    ([0.50, 0.52, 0.49, 0.51, 0.55, 0.47], [0.61, 0.59]),
    ([1.0, 1.0, 1.0], [0.9, 1.1, 1.3]),  # one group without spread
])
def test_welch_matches_scipy_unequal_variance_ttest(a, b):
    result = welch_t_test(a, b)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert result.t == pytest.approx(reference.statistic, rel=1e-10)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-10)


def test_welch_is_undefined_without_two_values_or_any_spread():
    assert math.isnan(welch_t_test([0.9], [0.8, 0.85]).p_value)
    assert math.isnan(welch_t_test([0.9, 0.9], [0.8, 0.8]).p_value)


def test_accuracy_interval_is_clipped_to_zero_one():
    # Three seeds near 1: mean 0.98, s = 0.02, half width t(0.975, 2) * 0.02 / sqrt(3) = 4.302653 * 0.011547 = 0.04968.
    raw, clipped = group_stats([0.96, 0.98, 1.0]), group_stats([0.96, 0.98, 1.0], bounds=ACCURACY_BOUNDS)
    assert raw.ci_high == pytest.approx(0.98 + 0.04968, abs=1e-5) and raw.ci_high > 1
    assert (clipped.ci_low, clipped.ci_high) == (pytest.approx(raw.ci_low), 1.0)
    assert group_stats([0.0, 0.02, 0.04], bounds=ACCURACY_BOUNDS).ci_low == 0.0


def test_holm_matches_hand_arithmetic():
    # Sorted 0.01, 0.02, 0.04, 0.30 (m = 4): 4 * 0.01 = 0.04; 3 * 0.02 = 0.06; 2 * 0.04 = 0.08; 1 * 0.30 = 0.30.
    assert holm([0.04, 0.30, 0.01, 0.02]) == pytest.approx([0.08, 0.30, 0.04, 0.06])
    # Step-down monotonicity: 3 * 0.011 = 0.033 < 4 * 0.01 = 0.04, so it is raised to 0.04; 2 * 0.6 caps at 1.
    assert holm([0.01, 0.011, 0.6, 0.7]) == pytest.approx([0.04, 0.04, 1.0, 1.0])


def test_holm_leaves_undefined_p_values_out_of_the_family():
    adjusted = holm([0.02, math.nan, 0.03])
    assert adjusted[0] == pytest.approx(0.04) and adjusted[2] == pytest.approx(0.04) and math.isnan(adjusted[1])
