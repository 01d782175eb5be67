"""The demo's paired t-interval: Student's t quantiles and the interval of a mean change."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pml_tcm.demo.seed_noise import PairedChange, paired_change, t_central_probability, t_quantile

# Two-sided 95 % quantiles of Student's t, as printed in statistics tables.
TABLE_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df, expected", sorted(TABLE_95.items()))
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 50])
def test_t_distribution_matches_scipy(df):
    stats = pytest.importorskip("scipy.stats")
    for t in (0.0, 0.3, 1.0, 2.5, 9.0):
        assert t_central_probability(t, df) == pytest.approx(1 - 2 * stats.t.sf(t, df), abs=1e-12)
    for confidence in (0.5, 0.9, 0.95, 0.99):
        assert t_quantile(confidence, df) == pytest.approx(
            stats.t.ppf(0.5 + confidence / 2, df), rel=1e-9
        )


def test_df_one_is_the_cauchy_distribution():
    # P(|T| <= t) = 2 atan(t) / pi for one degree of freedom
    for t in (0.1, 1.0, 3.0):
        assert t_central_probability(t, 1) == pytest.approx(2 * math.atan(t) / math.pi)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_degrees_of_freedom_are_refused(bad):
    with pytest.raises(ValueError, match="df"):
        t_central_probability(1.0, bad)


def test_bad_confidence_is_refused():
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="confidence"):
            t_quantile(bad, 3)


def test_interval_of_paired_differences_by_hand():
    # differences 1, 2, 3, 4, 5: mean 3, sample sd sqrt(2.5), t(0.975, 4) = 2.7764451
    change = paired_change({s: 10.0 for s in range(5)}, {s: 11.0 + s for s in range(5)})
    assert change.n == 5 and change.mean == pytest.approx(3.0)
    half = 2.7764451051977934 * math.sqrt(2.5) / math.sqrt(5)
    low, high = change.interval
    assert low == pytest.approx(3 - half) and high == pytest.approx(3 + half)
    assert change.distinguishable  # 1.04 to 4.96 excludes 0


def test_pairs_are_by_seed_not_by_position():
    # seeds 0 and 1 in different order; a seed without a partner is left out
    change = paired_change({1: 5.0, 0: 1.0, 7: 100.0}, {0: 2.0, 1: 5.5})
    np.testing.assert_array_equal(change.differences, [1.0, 0.5])


def test_an_interval_that_includes_zero_is_not_distinguishable():
    change = PairedChange(np.array([1.0, -1.0, 0.5]))
    assert change.interval[0] < 0 < change.interval[1]
    assert change.distinguishable is False


def test_one_seed_has_no_interval():
    change = PairedChange(np.array([0.3]))
    assert change.mean == 0.3 and change.interval is None and change.distinguishable is None
