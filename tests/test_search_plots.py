"""Search figures: every plot is written for d = 1..4 and each method; the Pareto front matches a plain
all-pairs reference."""

from __future__ import annotations

import numpy as np
import pytest

from emorl.search import grid_search, hierarchical_search, random_search
from emorl.search.plots import pareto_mask, plot_all, plot_complexity


def objective(u):
    u = np.asarray(u)

    def f(points):
        out = []
        for p in points:
            sc = {f"obj{i}": float(np.exp(-((p[i] - u[i]) ** 2) / 0.3) * (1 - 0.3 * p.mean())) for i in range(len(u))}
            out.append({"aggregate": float(np.mean(list(sc.values()))), "scores": sc})
        return out

    return f


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_plot_all_hierarchical(tmp_path, dim):
    u = [0.3, 0.8, 0.1, 0.6][:dim]
    res = hierarchical_search(objective(u), dim, 3, progress=False)
    names = ["reflection", "empathy", "fluency", "safety"][:dim]
    files = plot_all(res, names, tmp_path, mode="hidden")
    expected = {"history.png", "landscape.png", "weights.png"} | ({"tradeoff.png"} if dim > 1 else set())
    assert {p.name for p in files} == expected
    assert all(_png(p) for p in files)


def test_plot_baselines_and_complexity(tmp_path):
    f = objective([0.3, 0.8])
    for res in (grid_search(f, 2, 9, progress=False), random_search(f, 2, 20, progress=False)):
        files = plot_all(res, ["a", "b"], tmp_path / res.method)
        assert len(files) == 4 and all(_png(p) for p in files)
    rows = [{"dim": d, "iterations": n, "hierarchical": 3**d + (n - 1) * (3**d - 2**d), "grid": (2**n + 1) ** d}
            for d in (2, 3) for n in (2, 3, 4)]
    assert _png(plot_complexity(rows, tmp_path / "complexity.png"))


def test_analytic_objective_without_scores_skips_tradeoff(tmp_path):
    res = hierarchical_search(lambda p: -((p - 0.5) ** 2).sum(1), 2, 2, progress=False)
    assert {p.name for p in plot_all(res, ["a", "b"], tmp_path)} == {"history.png", "landscape.png", "weights.png"}


def test_pareto_mask_matches_all_pairs_reference():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        vals = rng.integers(0, 6, size=(120, k)).astype(float)  # many ties and duplicates
        ref = np.array([not any(np.all(q >= p) and np.any(q > p) for q in vals) for p in vals])
        assert (pareto_mask(vals) == ref).all()


def test_method_styles_one_colour_per_family_one_marker_per_method():
    from emorl.search.plots import method_styles

    names = ["base", "emorl", "emorl-convex", "uniform", "dynaopt", "gdpo", "soups", "soups-avg", "single:reflection",
             "single:empathy", "single:fluency", "someone-else"]
    st = method_styles(names)
    assert len({marker for _, marker in st.values()}) == len(names)  # no two methods share a marker
    colour = {n: c for n, (c, _) in st.items()}
    assert colour["uniform"] == colour["dynaopt"] == colour["gdpo"]  # one-policy baselines: one family
    assert colour["emorl"] == colour["emorl-convex"] and colour["soups"] == colour["soups-avg"]
    assert colour["single:reflection"] == colour["single:fluency"]
    families = {colour[n] for n in ("base", "emorl", "uniform", "soups", "single:empathy", "someone-else")}
    assert len(families) == 6
