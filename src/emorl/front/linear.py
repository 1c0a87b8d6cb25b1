"""Is a mix more than its parts? Lattice points against the linear prediction, and an edge sweep of two pools.

**Linear prediction.** Each adapter alone moves every objective by some amount from the base model. If the objectives
added up, a mix would score what its weights predict from those single moves:

- anchored mix (``h0 + Σ w_k (h_k − h0)``, task arithmetic ``W0 + Σ w_k ΔW_k``): ``base + Σ w_k (single_k − base)``;
- convex mix (``Σ w_k h_k / Σ w``, the parameter average): ``Σ (w_k / Σ w) single_k``.

The prediction is formed per (prompt, seed) unit, so ``actual − predicted`` is a paired difference with a bootstrap CI
that resamples prompts (each with all its seeds).
A point resolved above its prediction gains from mixing; one below loses (interference).

**Edge sweep.** Between two adapters, ``(t, 1 − t)`` for t = 0, 0.1, ..., 1, decoded by log-linear pooling (``hidden``:
mixed hidden states, i.e. mixed logits) and by linear pooling (``probs``: mixed next-token distributions). Log-linear
pooling can sharpen toward tokens neither adapter prefers; the question is whether an interior point of the sweep
scores below **both** ends (a dip), which linear pooling of the same pair does not show.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emorl.stats import bootstrap_ci, paired_difference

SWEEP_POINTS = 11


def linear_prediction(points: np.ndarray, singles: np.ndarray, base: np.ndarray, *, convex: bool) -> np.ndarray:
    """(points, units, objectives) predicted scores from ``singles`` (K, units, objectives), each adapter alone, and
    ``base`` (units, objectives); ``convex`` normalises each point's weights to sum 1."""
    w = np.asarray(points, dtype=float)
    if convex:
        w = w / w.sum(axis=1, keepdims=True)
        return np.einsum("pk,kuo->puo", w, singles)
    return base[None] + np.einsum("pk,kuo->puo", w, singles - base[None])


def linear_gaps(actual: np.ndarray, predicted: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                clusters: np.ndarray | None = None) -> dict[str, Any]:
    """Mean reward (mean over objectives) actual − predicted per point with its paired CI (resampling ``clusters``,
    the units' prompts), how many points are resolved above / below, and the average gap over all points with its
    CI."""
    a, p = actual.mean(axis=2), predicted.mean(axis=2)  # (points, units): mean reward per unit
    per_point = [paired_difference(a[i], p[i], clusters=clusters, resamples=resamples, seed=seed)
                 for i in range(a.shape[0])]
    gap = (a - p).mean(axis=0)  # per unit, averaged over points
    return {"points": len(per_point),
            "above": sum(d["resolved"] and d["mean"] > 0 for d in per_point),
            "below": sum(d["resolved"] and d["mean"] < 0 for d in per_point),
            "unresolved": sum(not d["resolved"] for d in per_point),
            "mean_gap": float(gap.mean()), "mean_gap_ci95": bootstrap_ci(gap, clusters=clusters, resamples=resamples,
                                                                            seed=seed),
            "per_point": [{"gap": d["mean"], "ci95": d["ci95"]} for d in per_point]}


def sweep_points(n_adapters: int, pair: tuple[int, int]) -> np.ndarray:
    """The 11 points (t, 1 − t) on the edge between adapters ``pair`` (others 0), t = 0, 0.1, ..., 1."""
    pts = np.zeros((SWEEP_POINTS, n_adapters))
    t = np.linspace(0.0, 1.0, SWEEP_POINTS)
    pts[:, pair[0]], pts[:, pair[1]] = t, 1.0 - t
    return pts


def sweep_dip(units: np.ndarray, *, resamples: int = 2000, seed: int = 0,
              clusters: np.ndarray | None = None) -> dict[str, Any]:
    """For one pool's sweep ((11, units, objectives) scores, ends first and last): the mean reward along it, and the
    interior point furthest below the lower end, with the paired difference (interior − lower end) and its CI.
    ``dip`` is true when that difference is resolved below 0 (below the lower end is below both ends)."""
    mr = units.mean(axis=2)  # (points, units)
    curve = mr.mean(axis=1)
    lower_end = 0 if curve[0] <= curve[-1] else len(curve) - 1
    i = 1 + int(np.argmin(curve[1:-1]))
    d = paired_difference(mr[i], mr[lower_end], clusters=clusters, resamples=resamples, seed=seed)
    return {"mean_reward": [float(x) for x in curve], "lowest_interior": i, "lower_end": lower_end,
            "interior_minus_lower_end": d, "dip": bool(d["resolved"] and d["mean"] < 0)}
