"""The search algorithms on analytic objectives (no model): optimum found, evaluation counts, direction
dedup, interrupt + resume, log guards, bad inputs."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest

from emorl.search import (
    PointStore,
    Score,
    best_subcube,
    expected_evaluations,
    grid_search,
    hierarchical_search,
    random_search,
)
from emorl.utils import EmorlError


class Peak:
    """exp(-|(w - u) * s|^2 / 0.1): one smooth peak at u; counts every point it is asked to score."""

    def __init__(self, u, scale=None):
        self.u = np.asarray(u, dtype=float)
        self.s = np.ones_like(self.u) if scale is None else np.asarray(scale, dtype=float)
        self.seen: list[tuple[float, ...]] = []

    def __call__(self, points):
        self.seen.extend(tuple(p) for p in points.tolist())
        return np.exp(-(((points - self.u) * self.s) ** 2).sum(1) / 0.1)


def reference_search(f, dim, iterations):
    """The reference code's algorithm, written plainly for any d: 3^d points per round, no memo."""
    lo, side = [0.0] * dim, 1.0
    best_w, best = None, -np.inf
    for _ in range(iterations):
        axes = [[lo[i], lo[i] + side / 2, lo[i] + side] for i in range(dim)]
        pts = list(itertools.product(*axes))
        vals = f(np.array(pts))
        for p, v in zip(pts, vals, strict=True):
            if v > best:
                best_w, best = p, v
        table = dict(zip(itertools.product(range(3), repeat=dim), vals, strict=True))
        sums = {o: sum(table[tuple(a + b for a, b in zip(o, c, strict=True))]
                       for c in itertools.product((0, 1), repeat=dim))
                for o in itertools.product((0, 1), repeat=dim)}
        o = max(sums, key=lambda k: sums[k])  # first maximum in product order, as best_subcube
        lo, side = [lo[i] + o[i] * side / 2 for i in range(dim)], side / 2
    return list(best_w), best


@pytest.mark.parametrize("u", [
    [0.3, 0.7],
    [0.62, 0.18, 0.41],
    [0.97, 0.02, 0.95],  # near a corner of the box
    [0.25, 0.8, 0.55, 0.1],
    [0.99, 0.99, 0.01, 0.98],  # near a corner, d = 4
])
def test_finds_optimum_within_final_resolution(u):
    n = 5
    f = Peak(u, scale=np.linspace(0.7, 1.5, len(u)))
    res = hierarchical_search(f, len(u), n, progress=False)
    assert np.abs(np.array(res.weights) - np.array(u)).max() <= 2.0**-n
    assert res.aggregate == pytest.approx(f(np.array([res.weights]))[0])


@pytest.mark.parametrize("dim,n", [(1, 1), (1, 5), (2, 5), (3, 5), (4, 3)])
def test_evaluation_count_formula_and_same_result_as_reference(dim, n):
    f = Peak(np.linspace(0.15, 0.85, dim))
    res = hierarchical_search(f, dim, n, progress=False, batch_points=7)
    assert len(f.seen) == len(set(f.seen)) == expected_evaluations(dim, n) == 3**dim + (n - 1) * (3**dim - 2**dim)
    assert res.n_decoded == res.n_unique == expected_evaluations(dim, n)
    ref_w, ref_best = reference_search(Peak(f.u), dim, n)
    assert res.weights == ref_w and res.aggregate == ref_best
    assert len(res.rounds) == n and res.rounds[-1].side == 2.0 ** -(n - 1)


def test_best_subcube_sums_corners():
    scores = np.zeros((3, 3))
    scores[2, 0] = 5.0  # only the corner of sub-cube (1, 0)
    assert best_subcube(scores) == (1, 0)
    scores[1, 1] = 4.0  # the centre belongs to every sub-cube: (1, 0) still wins
    assert best_subcube(scores) == (1, 0)
    assert best_subcube(np.zeros((3, 3, 3))) == (0, 0, 0)  # ties: the first


class Ray:
    """A scale-invariant objective (depends only on w / max w, computed exactly), with a degenerate score."""

    def __init__(self, u):
        self.u = np.asarray(u, dtype=float)
        self.seen: list[tuple[float, ...]] = []
        self.degenerate_calls = 0

    def __call__(self, points):
        out = []
        for p in points.tolist():
            assert any(p), "the all-zero point must never be decoded"
            self.seen.append(tuple(p))
            m = Fraction(max(p))
            d = np.array([float(Fraction(x) / m) for x in p])
            out.append({"aggregate": float(-((d - self.u) ** 2).sum()), "scores": {"a": float(d[0])}})
        return out

    def degenerate(self):
        self.degenerate_calls += 1
        return Score(-3.0, {"a": 0.0})


@pytest.mark.parametrize("dim", [2, 3])
def test_direction_dedup_fewer_evaluations_same_result(dim):
    u = np.array([1.0, 0.4, 0.7][:dim])

    class WithZero(Ray):  # without dedup the zero point is an ordinary point: give it the degenerate score
        def __call__(self, points):
            out = [None] * len(points)
            nz = [i for i, p in enumerate(points) if p.any()]
            for i, r in zip(nz, super().__call__(points[nz]), strict=True):
                out[i] = r
            for i in set(range(len(points))) - set(nz):
                out[i] = {"aggregate": -3.0, "scores": {"a": 0.0}}
            return out

    plain_f, dedup_f = WithZero(u), Ray(u)
    plain = hierarchical_search(plain_f, dim, 5, progress=False)
    dedup = hierarchical_search(dedup_f, dim, 5, scale_invariant=True, progress=False)
    assert len(plain_f.seen) + 1 == expected_evaluations(dim, 5)  # + the zero point, answered by WithZero
    assert len(dedup_f.seen) < len(plain_f.seen)
    rays = {tuple(Fraction(x) / Fraction(max(p)) for x in p) for p in dedup_f.seen}
    assert len(rays) == len(dedup_f.seen)  # each direction decoded once
    assert dedup_f.degenerate_calls == 1
    assert dedup.weights == plain.weights and dedup.aggregate == plain.aggregate and dedup.scores == plain.scores
    assert [p.aggregate for p in dedup.points] == [p.aggregate for p in plain.points]
    assert dedup.n_reused + dedup.n_decoded + 1 == dedup.n_unique


class Interrupt(Exception):
    pass


class Flaky(Peak):
    """Raises once it has scored ``fail_after`` points (like a killed process mid-round)."""

    def __init__(self, u, fail_after):
        super().__init__(u)
        self.fail_after = fail_after

    def __call__(self, points):
        if len(self.seen) + len(points) > self.fail_after:
            raise Interrupt
        return super().__call__(points)


HEADER = {"names": ["a", "b", "c"], "adapters": {"a": "1", "b": "2", "c": "3"}, "mode": "hidden"}


def test_interrupt_and_resume_identical_no_point_twice(tmp_path):
    u = [0.62, 0.18, 0.41]
    clean = hierarchical_search(Peak(u), 3, 4, progress=False, batch_points=5)
    flaky = Flaky(u, fail_after=40)  # round 1 has 27 points: this stops in round 2, between two batches
    with pytest.raises(Interrupt):
        hierarchical_search(flaky, 3, 4, store=PointStore(tmp_path, HEADER), progress=False, batch_points=5)
    assert 27 < len(flaky.seen) <= 40
    rest = Peak(u)
    store = PointStore(tmp_path, HEADER, resume=True)
    resumed = hierarchical_search(rest, 3, 4, store=store, progress=False, batch_points=5)
    both = flaky.seen + rest.seen
    assert len(both) == len(set(both)) == expected_evaluations(3, 4)
    assert resumed.weights == clean.weights and resumed.aggregate == clean.aggregate
    assert [p.weights for p in resumed.points] == [p.weights for p in clean.points]
    assert resumed.n_cached == len(flaky.seen)
    # the log holds each point once; resuming a finished search scores nothing
    lines = (tmp_path / "points.jsonl").read_text().splitlines()
    assert len(lines) == 1 + expected_evaluations(3, 4)
    again = Peak(u)
    done = hierarchical_search(again, 3, 4, store=PointStore(tmp_path, HEADER, resume=True), progress=False)
    assert again.seen == [] and done.weights == clean.weights
    # one more round extends it: only the new round's 3^d - 2^d points are scored
    more = Peak(u)
    hierarchical_search(more, 3, 5, store=PointStore(tmp_path, HEADER, resume=True), progress=False)
    assert len(more.seen) == 27 - 8


def test_resume_survives_torn_last_line(tmp_path):
    store = PointStore(tmp_path, HEADER)
    hierarchical_search(Peak([0.2, 0.3, 0.9]), 3, 1, store=store, progress=False)
    with open(tmp_path / "points.jsonl", "a") as f:
        f.write('{"weights": [0.5, 0.5')  # killed mid-write
    f2 = Peak([0.2, 0.3, 0.9])
    hierarchical_search(f2, 3, 1, store=PointStore(tmp_path, HEADER, resume=True), progress=False)
    assert f2.seen == []


def test_log_from_other_adapters_refused(tmp_path):
    PointStore(tmp_path, HEADER)
    other = {**HEADER, "adapters": {"a": "1", "b": "2", "c": "999"}}
    with pytest.raises(EmorlError, match="other adapters"):
        PointStore(tmp_path, other, resume=True)
    with pytest.raises(EmorlError, match="prompts"):
        PointStore(tmp_path, {**HEADER, "prompts": 8}, resume=True)
    with pytest.raises(EmorlError, match="--resume"):
        PointStore(tmp_path, HEADER)  # an existing log is never silently overwritten
    PointStore(tmp_path, other, overwrite=True)  # --fresh
    assert json.loads((tmp_path / "points.jsonl").read_text().splitlines()[0])["adapters"]["c"] == "999"


def test_bad_inputs():
    f = Peak([0.5])
    with pytest.raises(EmorlError, match="dim >= 1"):
        hierarchical_search(f, 0, 3, progress=False)
    with pytest.raises(EmorlError, match="iterations must be >= 1"):
        hierarchical_search(f, 1, 0, progress=False)
    with pytest.raises(EmorlError, match="NaN"):
        hierarchical_search(lambda p: np.full(len(p), np.nan), 2, 1, progress=False)
    with pytest.raises(EmorlError, match="returned 1 scores for 9"):
        hierarchical_search(lambda p: [0.0], 2, 1, progress=False, batch_points=9)
    with pytest.raises(EmorlError, match="grid_points"):
        grid_search(f, 1, 1, progress=False)


def test_grid_and_random_baselines():
    u = [0.3, 0.7]
    f = Peak(u)
    g = grid_search(f, 2, 33, progress=False)
    assert len(f.seen) == 33**2 and np.abs(np.array(g.weights) - u).max() <= 1 / 64
    r1, r2 = random_search(Peak(u), 2, 50, seed=3, progress=False), random_search(Peak(u), 2, 50, seed=3,
                                                                                  progress=False)
    assert r1.weights == r2.weights and r1.n_unique == 50
    h = Peak(u)
    hierarchical_search(h, 2, 5, progress=False)
    assert len(h.seen) == expected_evaluations(2, 5) < len(f.seen)


class _LovesEmpty:
    """A user reward that scores an empty reply 1, above any text (0.9 × the share of adapter 0's word)."""

    name = "loves-empty"

    def __call__(self, prompts, replies):
        return np.array([1.0 if not r else 0.9 * r.split().count("a") / len(r.split()) for r in replies])


class _WordEnsemble:
    """An 'ensemble' whose reply to every prompt is 10 words, adapter i's word in proportion to w_i / Σw (a convex
    mix: it depends on the direction only)."""

    names = ["x", "y", "z"]

    def generate(self, prompts, weights, **kw):
        out = []
        for w in np.asarray(weights, float):
            assert w.sum() > 0, "the all-zero point of a convex mix must never be decoded"
            counts = np.floor(10 * w / w.sum() + 1e-9).astype(int)
            out.append([" ".join(["a"] * counts[0] + ["b"] * counts[1] + ["c"] * counts[2]) for _ in prompts])
        return out


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_convex_search_never_returns_the_all_zero_point_even_if_a_reward_loves_empty_replies(seeds):
    from emorl.config import GenerationConfig
    from emorl.search.objective import EnsembleObjective

    obj = EnsembleObjective(_WordEnsemble(), ["p1", "p2"], {"e": _LovesEmpty()}, mode="hidden", anchor="none",
                            generation=GenerationConfig(do_sample=True), seeds=seeds)
    assert obj.scale_invariant
    res = hierarchical_search(obj, 3, 3, scale_invariant=True, progress=False)
    assert any(res.weights), "w = 0 has no direction: a convex search must not return it"
    assert res.weights[0] > 0 and res.weights[1] == res.weights[2] == 0  # the best real direction: all adapter 0
    assert res.aggregate == pytest.approx(0.9)
    # called directly with the zero point (other search methods), it is never a candidate either
    scores = obj(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert scores[0].aggregate == -np.inf and scores[1].aggregate == pytest.approx(0.9)
