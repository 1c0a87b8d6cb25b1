"""Paired bootstrap, Pareto fronts, hypervolume and dominance, against values computed by hand."""

import json

import numpy as np
import pytest

from emorl.evaluate_stats import add_confidence
from emorl.stats import (
    bootstrap_ci,
    dominance,
    dominates,
    hypervolume,
    hypervolume_ci,
    hypervolume_difference,
    paired_difference,
    pareto_front,
)


def test_bootstrap_ci_hand_checkable():
    # values [0, 0, 0, 4]: a resample's mean is the number c of 4s drawn, c ~ Binomial(4, 1/4):
    # P(c<=2) = 0.949 < 0.975 <= P(c<=3) = 0.996, and P(c=0) = 0.316 > 0.025, so the 95% CI is [0, 3].
    assert bootstrap_ci([0, 0, 0, 4], resamples=20000, seed=1) == [0.0, 3.0]
    # [0, 1, 2]: P(mean=0) = P(mean=2) = 1/27 > 0.025, so the CI is the whole range [0, 2]
    assert bootstrap_ci([0, 1, 2], resamples=20000, seed=1) == [0.0, 2.0]


def test_cluster_bootstrap_resamples_prompts_with_all_their_seeds():
    # two seeds of the prompts [0, 0, 0, 4] (units in (seed, prompt) order; the prompt that scores 4 does so in both
    # seeds): a resample draws 4 prompts and its mean is the number c of 4-prompts drawn, c ~ Binomial(4, 1/4), so
    # the CI is [0, 3] as for one seed (test above); as 8 independent units, the mean is c'/2 with c' ~ Binomial(8,
    # 1/4): P(c' <= 4) = 0.973 < 0.975 <= P(c' <= 5) = 0.996, so the too-narrow unit CI is [0, 2.5].
    v = [0, 0, 0, 4, 0, 0, 0, 4]
    prompts = [0, 1, 2, 3, 0, 1, 2, 3]
    assert bootstrap_ci(v, clusters=prompts, resamples=20000, seed=1) == [0.0, 3.0]
    assert bootstrap_ci(v, resamples=20000, seed=1) == [0.0, 2.5]
    # the same draws as the one-seed bootstrap over the prompts' means
    assert bootstrap_ci(v, clusters=prompts, seed=5) == bootstrap_ci([0, 0, 0, 4], seed=5)
    d = paired_difference(v, np.zeros(8), clusters=prompts, resamples=20000, seed=1)
    assert d["ci95"] == [0.0, 3.0] and not d["resolved"]
    with pytest.raises(ValueError, match="one id per unit"):
        bootstrap_ci(v, clusters=prompts[:4])


def test_cluster_bootstrap_with_one_seed_is_todays_unit_bootstrap():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    one_seed = np.arange(30)  # every prompt its own cluster
    assert bootstrap_ci(a, clusters=one_seed, seed=2) == bootstrap_ci(a, seed=2)
    assert paired_difference(a, b, clusters=one_seed, seed=2) == paired_difference(a, b, seed=2)
    s, t, r = rng.random((4, 12, 2)), rng.random((4, 12, 2)), rng.random((12, 2)) * 0.2
    assert hypervolume_ci(s, r, clusters=np.arange(12), resamples=50) == hypervolume_ci(s, r, resamples=50)
    assert hypervolume_difference(s, t, r, clusters=np.arange(12), resamples=50) == \
        hypervolume_difference(s, t, r, resamples=50)
    # unequal cluster sizes: the mean over each resample's units
    assert bootstrap_ci([1.0, 1.0, 1.0, 5.0], clusters=["x", "x", "x", "y"], resamples=200) == [1.0, 5.0]


def test_evaluation_differences_resample_prompts(tmp_path):
    """add_confidence on two seeds of 4 prompts: EMORL scores 1 on the last prompt in both seeds, Uniform 0 everywhere;
    the difference's CI resamples prompts: c/4 with c ~ Binomial(4, 1/4) -> [0, 0.75] (P(c <= 2) = 0.949)."""
    replies = tmp_path / "eval" / "replies"
    replies.mkdir(parents=True)
    for name, last in (("emorl", 1.0), ("uniform", 0.0)):
        rows = [{"seed": s, "prompt": f"p{i}", "reply": "r", "tokens": 3, "scores": {"a": last if i == 3 else 0.0}}
                for s in (7, 8) for i in range(4)]
        (replies / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"mean_reward": {"mean": 0.0}}
    results = {"objectives": ["a"], "prompts": 4, "seeds": [7, 8],
               "methods": {n: {"label": n, "summary": json.loads(json.dumps(summary))} for n in ("emorl", "uniform")}}
    out = add_confidence(tmp_path, results)
    d = out["methods"]["emorl"]["differences"]["uniform"]["mean_reward"]
    assert d["mean"] == pytest.approx(0.25) and d["ci95"] == [0.0, 0.75]
    assert out["bootstrap"]["resampled"] == "prompts"


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
