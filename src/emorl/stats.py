"""Statistics of a comparison: paired bootstrap confidence intervals, Pareto fronts, hypervolume, dominance.

Every method is decoded on the same prompts with the same seeds, so a per-reply score is indexed by a *unit*
(prompt, seed) shared by all methods. The bootstrap resamples *prompts* with replacement, each with all its seeds
(a cluster bootstrap: ``clusters`` gives each unit's prompt; the units of one prompt are correlated, so resampling
them as independent gives too narrow a CI), and a difference between two methods resamples the same prompts for
both (paired), which removes the prompt-to-prompt variance that both share. With one seed per prompt (or no
``clusters``) every unit is its own cluster and the draws are those of a plain unit bootstrap. All resampling is
seeded (``numpy.random.default_rng(seed)``), so a CI is reproducible.

Fronts are for maximisation: a point p dominates q when p ≥ q in every objective and p > q in one. The
hypervolume of a point set against a reference point r is the volume of the union of the boxes [r, p] (points
not above r in every objective add nothing); it is exact, computed by slicing along the last objective
(O(n^d), fine for the lattices of a few hundred points used here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


# ------------------------------------------------------------------------------------------- bootstrap

Clusters = Sequence[Any] | np.ndarray | None  # one cluster id (the prompt) per unit; None: every unit its own


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) indices drawn with replacement; the same seed gives the same draws for every method."""
    if n < 1:
        raise ValueError("the bootstrap needs at least one unit")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def cluster_members(n: int, clusters: Clusters) -> list[np.ndarray]:
    """The unit indices of each cluster, clusters in order of first appearance (units in order within one)."""
    if clusters is None:
        return [np.array([i]) for i in range(n)]
    ids = np.asarray(clusters).ravel().tolist()
    if len(ids) != n:
        raise ValueError(f"clusters: one id per unit needed, got {len(ids)} for {n} units")
    members: dict[Any, list[int]] = {}
    for i, c in enumerate(ids):
        members.setdefault(c, []).append(i)
    return [np.array(m) for m in members.values()]


def draws(n: int, resamples: int, seed: int, clusters: Clusters = None) -> np.ndarray | list[np.ndarray]:
    """The unit indices of every resample: clusters drawn with replacement, each bringing all its units.

    Equal-sized clusters (every prompt with the same seeds) give one (resamples, units) array; with singleton
    clusters it is exactly :func:`_indices`'s draw. Unequal sizes give a list of index arrays."""
    groups = cluster_members(n, clusters)
    idx = _indices(len(groups), resamples, seed)
    if len({len(g) for g in groups}) == 1:
        return np.stack(groups)[idx].reshape(resamples, -1)
    return [np.concatenate([groups[c] for c in row]) for row in idx]


def resampled_means(values: np.ndarray, picks: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """The mean of ``values`` (…, units) over each resample's units -> (…, resamples)."""
    if isinstance(picks, np.ndarray):
        return values[..., picks].mean(axis=-1)
    return np.stack([values[..., p].mean(axis=-1) for p in picks], axis=-1)


def _interval(stats: np.ndarray, level: float) -> list[float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return [float(lo), float(hi)]


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, clusters: Clusters = None, resamples: int = RESAMPLES,
                 seed: int = 0, level: float = LEVEL) -> list[float]:
    """Percentile CI of the mean of per-unit ``values`` (one per (prompt, seed) unit), resampling ``clusters``."""
    v = np.asarray(values, dtype=float)
    return _interval(resampled_means(v, draws(v.size, resamples, seed, clusters)), level)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, clusters: Clusters = None,
                      resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """mean(a) − mean(b) with its paired-bootstrap CI: ``a[i]`` and ``b[i]`` are the same unit, and each
    resample draws the same clusters (prompts) for both. ``resolved`` is true when the CI excludes 0."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same units: {x.shape} vs {y.shape}")
    d = x - y
    lo, hi = _interval(resampled_means(d, draws(d.size, resamples, seed, clusters)), level)
    return {"mean": float(d.mean()), "ci95": [lo, hi], "resolved": bool(lo > 0 or hi < 0)}


def bootstrap_statistic(units: int, statistic: Callable[[np.ndarray], float], *, clusters: Clusters = None,
                        resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> list[float]:
    """Percentile CI of any ``statistic(unit_indices)`` (e.g. a hypervolume recomputed on resampled prompts)."""
    return _interval(np.array([statistic(i) for i in draws(units, resamples, seed, clusters)]), level)


# ------------------------------------------------------------------------------------------- fronts

def dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    """p ≥ q everywhere and p > q somewhere (maximisation)."""
    a, b = np.asarray(p, float), np.asarray(q, float)
    return bool(np.all(a >= b) and np.any(a > b))


def pareto_front(points: Sequence[Sequence[float]] | np.ndarray) -> list[int]:
    """Indices of the non-dominated points, in input order (of equal points, the first is kept)."""
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return []
    keep: list[int] = []
    for i, p in enumerate(pts):
        if np.any(np.all(pts >= p, axis=1) & np.any(pts > p, axis=1)):
            continue
        if keep and np.any(np.all(pts[keep] == p, axis=1)):
            continue
        keep.append(i)
    return keep


def _hv(pts: np.ndarray, ref: np.ndarray) -> float:
    d = pts.shape[1]
    if pts.shape[0] == 0:
        return 0.0
    if d == 1:
        return float(pts[:, 0].max() - ref[0])
    order = np.argsort(-pts[:, -1], kind="stable")
    pts = pts[order]
    total = 0.0
    for i in range(len(pts)):
        low = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        height = pts[i, -1] - low
        if height > 0:
            total += _hv(pts[: i + 1, :-1], ref[:-1]) * height
    return total


def hypervolume(points: Sequence[Sequence[float]] | np.ndarray, ref: Sequence[float]) -> float:
    """Exact hypervolume (maximisation) of ``points`` against the reference point ``ref``."""
    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    r = np.asarray(ref, dtype=float)
    pts = pts[np.all(pts > r, axis=1)]
    if pts.size == 0:
        return 0.0
    return _hv(pts[pareto_front(pts)], r)


def dominance(front: Sequence[Sequence[float]] | np.ndarray, point: Sequence[float]) -> dict[str, Any]:
    """How one point stands against a front: the front points that dominate it, those it dominates, and a verdict
    (``dominated`` — the front holds a better trade-off in every objective; ``dominates`` — the point is better
    than some front point and dominated by none; ``incomparable`` otherwise)."""
    f = np.asarray(front, dtype=float)
    by = [i for i, q in enumerate(f) if dominates(q, point)]
    over = [i for i, q in enumerate(f) if dominates(point, q)]
    verdict = "dominated" if by else "dominates" if over else "incomparable"
    return {"verdict": verdict, "dominated_by": by, "dominates": over}


def hypervolume_ci(unit_scores: np.ndarray, ref_units: np.ndarray | Sequence[float], *, clusters: Clusters = None,
                   resamples: int = 500, seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """Hypervolume of a set of points with a bootstrap CI over units.

    ``unit_scores`` is (points, units, objectives): every point's per-unit scores on the same units. ``ref_units``
    is either a fixed reference point (objectives,) or per-unit reference scores (units, objectives) — e.g. the
    base model's — resampled with the same units (paired)."""
    s = np.asarray(unit_scores, dtype=float)
    r = np.asarray(ref_units, dtype=float)
    per_unit_ref = r.ndim == 2

    def hv(idx: np.ndarray) -> float:
        ref = r[idx].mean(axis=0) if per_unit_ref else r
        return hypervolume(s[:, idx].mean(axis=1), ref)

    full = np.arange(s.shape[1])
    return {"hypervolume": hv(full), "ci95": bootstrap_statistic(s.shape[1], hv, clusters=clusters,
                                                                 resamples=resamples, seed=seed, level=level)}


def hypervolume_difference(units_a: np.ndarray, units_b: np.ndarray, ref_units: np.ndarray | Sequence[float], *,
                           clusters: Clusters = None, resamples: int = 500, seed: int = 0,
                           level: float = LEVEL) -> dict[str, Any]:
    """HV(a) − HV(b) of two point sets scored on the same units, with a paired bootstrap CI: each resample draws the
    same units for both sets (and for a per-unit reference). ``resolved``: the CI excludes 0."""
    a, b = np.asarray(units_a, dtype=float), np.asarray(units_b, dtype=float)
    r = np.asarray(ref_units, dtype=float)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired hypervolumes need the same units: {a.shape[1]} vs {b.shape[1]}")

    def diff(idx: np.ndarray) -> float:
        ref = r[idx].mean(axis=0) if r.ndim == 2 else r
        return hypervolume(a[:, idx].mean(axis=1), ref) - hypervolume(b[:, idx].mean(axis=1), ref)

    lo, hi = bootstrap_statistic(a.shape[1], diff, clusters=clusters, resamples=resamples, seed=seed, level=level)
    return {"mean": diff(np.arange(a.shape[1])), "ci95": [lo, hi], "resolved": bool(lo > 0 or hi < 0)}
