"""The acceptance report's arithmetic on hand-made score lists: counts, rates, intervals, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from o2n_edge.acceptance.operating_point import (
    binomial_ci,
    operating_point,
    per_type_escapes,
    rate,
    threshold_for_frr,
)


def test_counts_follow_the_runtime_rule_reject_when_above() -> None:
    # goods 0.1 0.2 0.5 0.9; defects 0.05 0.5 0.6; threshold 0.5
    labels = [0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.5, 0.9, 0.05, 0.5, 0.6]
    op = operating_point(labels, scores, 0.5)
    assert (op.false_reject.count, op.false_reject.n) == (1, 4)  # only 0.9 > 0.5; the tie passes
    assert (op.escape.count, op.escape.n) == (2, 3)  # 0.05 and the tie 0.5 pass
    assert op.false_reject.rate == pytest.approx(0.25)
    assert op.escape.rate == pytest.approx(2 / 3)
    assert op.false_reject.ci_low < 0.25 < op.false_reject.ci_high


def test_clopper_pearson_at_zero_and_all_events_has_closed_form() -> None:
    # k = 0: upper = 1 - (alpha/2)^(1/n); k = n: lower = (alpha/2)^(1/n)
    lo, hi = binomial_ci(0, 10, 0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
    assert hi == pytest.approx(0.30850, abs=1e-5)
    lo, hi = binomial_ci(10, 10, 0.95)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10), abs=1e-9)
    lo, hi = binomial_ci(0, 25, 0.90)
    assert hi == pytest.approx(1 - 0.05 ** (1 / 25), abs=1e-9)


def test_clopper_pearson_matches_published_table_value() -> None:
    # 5 of 20, 95%: (0.0866, 0.4910) in the Clopper-Pearson tables (e.g. Newcombe 1998, method 5)
    lo, hi = binomial_ci(5, 20)
    assert lo == pytest.approx(0.0866, abs=1e-4)
    assert hi == pytest.approx(0.4910, abs=1e-4)
    # 1 of 4 (the first test's false rejects): (0.0063, 0.8059)
    lo, hi = binomial_ci(1, 4)
    assert lo == pytest.approx(0.0063, abs=1e-4) and hi == pytest.approx(0.8059, abs=1e-4)


def test_rate_without_trials_is_none_not_zero() -> None:
    r = rate(0, 0)
    assert r.rate is None and r.ci_low is None and r.ci_high is None
    with pytest.raises(ValueError, match="count must be in"):
        binomial_ci(5, 4)
    with pytest.raises(ValueError, match="confidence"):
        binomial_ci(1, 4, 1.0)


def test_threshold_for_target_frr() -> None:
    goods = np.arange(1, 11) / 10.0  # 0.1 .. 1.0
    t = threshold_for_frr(goods, 0.10)  # one of ten may be rejected: the 2nd highest
    assert t == pytest.approx(0.9)
    assert int((goods > t).sum()) == 1
    assert threshold_for_frr(goods, 0.0) == pytest.approx(1.0)  # no reject: the highest good
    assert threshold_for_frr(goods, 0.05) == pytest.approx(1.0)  # 0.5 images may not be rejected
    assert threshold_for_frr(goods, 0.25) == pytest.approx(0.8)  # floor(2.5) = 2 rejects
    # it is the lowest such threshold: anything lower rejects more than allowed
    below = np.nextafter(t, -np.inf)
    assert (goods > below).sum() / goods.size > 0.10


def test_threshold_for_target_frr_with_ties() -> None:
    goods = np.array([1.0, 2.0, 3.0, 3.0, 3.0])
    t = threshold_for_frr(goods, 0.2)  # one may go, but the top three are tied: all pass together
    assert t == 3.0
    assert int((goods > t).sum()) == 0
    t = threshold_for_frr(goods, 0.6)  # three may go: the tied three are rejected, 2.0 passes
    assert t == 2.0 and int((goods > t).sum()) == 3


def test_threshold_for_target_frr_is_exact_at_float_boundaries() -> None:
    goods = np.arange(100, dtype=np.float64)
    t = threshold_for_frr(goods, 0.29)  # 0.29 * 100 = 28.999999999999996 in floats
    assert int((goods > t).sum()) == 29
    t = threshold_for_frr(np.arange(300, dtype=np.float64), 0.01)
    assert int((np.arange(300) > t).sum()) == 3


def test_threshold_for_target_frr_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        threshold_for_frr([], 0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        threshold_for_frr([1.0], 1.0)
    with pytest.raises(ValueError, match="NaN"):
        threshold_for_frr([1.0, math.nan], 0.1)


def test_per_type_escapes_at_two_thresholds() -> None:
    defects = ["good", "good", "cut", "cut", "cut", "hole"]
    scores = [0.1, 0.3, 0.2, 0.4, 0.9, 0.35]
    out = per_type_escapes(defects, scores, (0.3, 0.1))
    assert list(out) == ["cut", "hole"]
    cut_bundle, cut_target = out["cut"]
    assert (cut_bundle.count, cut_bundle.n) == (1, 3)  # 0.2 <= 0.3
    assert (cut_target.count, cut_target.n) == (0, 3)
    assert (out["hole"][0].count, out["hole"][0].n) == (0, 1)


def test_operating_point_refuses_broken_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        operating_point([0, 1], [0.1, math.nan], 0.5)
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        operating_point([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="one length"):
        operating_point([0, 1, 1], [0.1, 0.2], 0.5)
