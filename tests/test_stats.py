"""Paired bootstrap, Pareto fronts, hypervolume and dominance, against values computed by hand."""

import numpy as np
import pytest

from emorl.stats import bootstrap_ci, dominance, dominates, hypervolume, hypervolume_ci, paired_difference, pareto_front


def test_bootstrap_ci_hand_checkable():
    # values [0, 0, 0, 4]: a resample's mean is the number c of 4s drawn, c ~ Binomial(4, 1/4):
    # P(c<=2) = 0.949 < 0.975 <= P(c<=3) = 0.996, and P(c=0) = 0.316 > 0.025, so the 95% CI is [0, 3].
    assert bootstrap_ci([0, 0, 0, 4], resamples=20000, seed=1) == [0.0, 3.0]
    # [0, 1, 2]: P(mean=0) = P(mean=2) = 1/27 > 0.025, so the CI is the whole range [0, 2]
    assert bootstrap_ci([0, 1, 2], resamples=20000, seed=1) == [0.0, 2.0]


def test_bootstrap_is_seeded():
    v = np.random.default_rng(0).normal(size=50)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(v, seed=3) != bootstrap_ci(v, seed=4)


def test_paired_difference_removes_shared_variance():
    a = np.array([0.1, 0.9, 0.3, 0.7, 0.5])
    b = a - 0.1  # the same units, b always 0.1 lower: the paired CI is exactly [0.1, 0.1]
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.1)
    assert d["ci95"] == pytest.approx([0.1, 0.1])
    assert d["resolved"]
    # unpaired, the two means' CIs overlap widely
    lo_a, hi_a = bootstrap_ci(a)
    lo_b, hi_b = bootstrap_ci(b)
    assert lo_a < hi_b
    same = paired_difference([1.0, 0.0], [0.0, 1.0])  # differences +1, -1: CI [-1, 1] holds 0
    assert same["ci95"] == [-1.0, 1.0] and not same["resolved"]
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_pareto_front_and_dominance():
    pts = [(1, 3), (2, 2), (3, 1), (1, 1), (2, 2), (0.5, 3)]
    assert pareto_front(pts) == [0, 1, 2]  # (1,1) and (0.5,3) dominated; the repeated (2,2) kept once
    assert dominates((2, 2), (1, 2)) and not dominates((2, 2), (2, 2)) and not dominates((3, 1), (1, 3))
    front = [pts[i] for i in pareto_front(pts)]
    assert dominance(front, (1.5, 1.5)) == {"verdict": "dominated", "dominated_by": [1], "dominates": []}
    assert dominance(front, (2.5, 2.5))["verdict"] == "dominates"
    assert dominance(front, (2.5, 2.5))["dominates"] == [1]
    assert dominance(front, (4, 0))["verdict"] == "incomparable"


def test_hypervolume_2d_by_hand():
    # boxes [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1]: strips of width 1 and heights 3, 2, 1 -> 6
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (0, 0)) == pytest.approx(6.0)
    assert hypervolume([(1, 3), (2, 2), (3, 1), (1, 1)], (0, 0)) == pytest.approx(6.0)  # a dominated point adds 0
    # reference (1, 1): (1,3) has zero width and adds nothing; boxes [1,2]x[1,2] and [1,3]x[1,1] -> 1
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (1, 1)) == pytest.approx(1.0)
    assert hypervolume([(0.5, 0.5)], (1, 1)) == 0.0


def test_hypervolume_3d_by_hand():
    # two boxes: 1 + 2*2*0.5 - overlap [0,1]x[0,1]x[0,0.5] = 1 + 2 - 0.5
    assert hypervolume([(1, 1, 1), (2, 2, 0.5)], (0, 0, 0)) == pytest.approx(2.5)
    # (3,1,1), (1,3,1), (1,1,3): inclusion-exclusion 3*3 - 3*1 + 1 = 7
    assert hypervolume([(3, 1, 1), (1, 3, 1), (1, 1, 3)], (0, 0, 0)) == pytest.approx(7.0)
    assert hypervolume([(3, 1, 1), (1, 3, 1), (1, 1, 3)], (0.5, 0.5, 0.5)) == pytest.approx(
        3 * 2.5 * 0.25 - 3 * 0.25 * 0.5 + 0.125)


def test_hypervolume_ci_paired_reference():
    # two points, 4 units; the reference is the per-unit base score, resampled with the same units
    s = np.array([[[1, 0.2], [1, 0.2], [1, 0.2], [1, 0.2]],
                  [[0.2, 1], [0.2, 1], [0.2, 1], [0.2, 1]]])
    out = hypervolume_ci(s, np.zeros((4, 2)), resamples=50)
    # boxes [0,1]x[0,0.2] and [0,0.2]x[0,1]: 0.2 + 0.2 - 0.04; every resample is identical
    assert out["hypervolume"] == pytest.approx(0.36)
    assert out["ci95"] == pytest.approx([0.36, 0.36])


def test_hypervolume_difference_is_paired_and_hand_checkable():
    from emorl.stats import hypervolume_difference

    # two 2-D point sets on 3 units whose per-unit scores are constant: no resampling noise
    a = np.array([[[2.0, 1.0]] * 3, [[1.0, 2.0]] * 3])  # points (2,1), (1,2): HV over (0,0) = 2 + 2 - 1 = 3
    b = np.array([[[1.0, 1.0]] * 3])  # (1,1): HV 1
    d = hypervolume_difference(a, b, [0.0, 0.0], resamples=50)
    assert d["mean"] == pytest.approx(2.0) and d["ci95"] == pytest.approx([2.0, 2.0]) and d["resolved"]
    same = hypervolume_difference(a, a, np.zeros((3, 2)), resamples=50)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0] and not same["resolved"]
