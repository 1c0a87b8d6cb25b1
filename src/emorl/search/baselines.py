"""Comparators with the same objective interface as :func:`hierarchical_search`: a full grid and random
search. They share the :class:`Evaluator` (memo, direction dedup, batching, log), so evaluation counts
compare the algorithms, not their bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from emorl.search.evaluator import Evaluator
from emorl.search.hierarchical import SearchResult, _result, check_search_args
from emorl.utils import EmorlError


def full_grid(dim: int, points_per_axis: int) -> np.ndarray:
    """Every point of the regular grid with ``points_per_axis`` values in [0, 1] on each axis, (N^d, d)."""
    axis = np.linspace(0.0, 1.0, points_per_axis)
    return np.stack(np.meshgrid(*([axis] * dim), indexing="ij"), axis=-1).reshape(-1, dim)


def grid_search(objective: Callable[[np.ndarray], Sequence[Any]], dim: int, points_per_axis: int = 9, *,
                scale_invariant: bool = False, store: Any = None, progress: bool = True, batch_points: int = 8,
                chunk: int = 4096, box: float = 1.0) -> SearchResult:
    """Score every point of the full grid (N^d points; ``points_per_axis = 2^n + 1`` has the resolution of
    n hierarchical rounds). Points are fed to the evaluator ``chunk`` at a time to bound memory."""
    check_search_args(dim, 1)
    if points_per_axis < 2:
        raise EmorlError(f"grid_points must be >= 2 (both ends of each axis), got {points_per_axis}")
    grid = full_grid(dim, points_per_axis) * box
    ev = Evaluator(objective, dim, scale_invariant=scale_invariant, store=store, batch_points=batch_points,
                   progress=progress, total=len(grid), desc="grid search")
    try:
        for i in range(0, len(grid), chunk):
            ev.evaluate(grid[i:i + chunk], round=0)
    finally:
        ev.close()
    return _result("grid", ev, [])


def random_search(objective: Callable[[np.ndarray], Sequence[Any]], dim: int, n_points: int = 64, *, seed: int = 0,
                  scale_invariant: bool = False, store: Any = None, progress: bool = True,
                  batch_points: int = 8, box: float = 1.0) -> SearchResult:
    """Score ``n_points`` points drawn uniformly from [0, box]^d (seeded, so a resumed run draws the same)."""
    check_search_args(dim, 1)
    if n_points < 1:
        raise EmorlError(f"random_points must be >= 1, got {n_points}")
    pts = np.random.default_rng(seed).random((n_points, dim)) * box
    ev = Evaluator(objective, dim, scale_invariant=scale_invariant, store=store, batch_points=batch_points,
                   progress=progress, total=n_points, desc="random search")
    try:
        ev.evaluate(pts, round=0)
    finally:
        ev.close()
    return _result("random", ev, [])
