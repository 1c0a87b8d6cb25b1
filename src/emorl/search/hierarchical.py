"""Hierarchical grid search (Kong et al. 2025, §3.3), for any number of objectives d >= 1.

The paper's algorithm, which this module follows line by line:

    box = [0, 1]^d
    repeat `iterations` times:
        evaluate 3 points per axis in the box (its corners, edge midpoints, ..., centre): 3^d points
        of the 2^d sub-cubes made by adjacent grid points, keep the one whose 2^d corner scores sum highest
        halve the box to that sub-cube
    return the best point seen

Unlike the reference code (hard-coded d = 3), a point shared by two rounds is scored once: the corners of
the kept sub-cube are grid points of the next round, so n rounds cost 3^d + (n-1)(3^d - 2^d) evaluations,
not n·3^d. Every coordinate stays a dyadic fraction k / 2^n, so the memo keys are exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emorl.search.evaluator import Evaluator, PointRecord
from emorl.utils import EmorlError


@dataclass
class Round:
    """One zoom step: the box searched, the sub-cube kept, and the best point after this round."""

    index: int
    lo: list[float]
    side: float
    kept_offset: list[int]  # which half of each axis was kept (0 = lower, 1 = upper)
    best_weights: list[float]
    best_aggregate: float

    @property
    def hi(self) -> list[float]:
        return [x + self.side for x in self.lo]


@dataclass
class SearchResult:
    """What a search returns (and what ``best.json`` holds)."""

    method: str
    weights: list[float]
    aggregate: float
    scores: dict[str, float]
    points: list[PointRecord]  # every point the search asked for, in order
    rounds: list[Round] = field(default_factory=list)
    n_decoded: int = 0  # points actually passed to the objective in this process
    n_reused: int = 0  # points answered by another point on the same ray (scale invariance)
    n_cached: int = 0  # points answered from a resumed log
    objective_calls: int = 0

    @property
    def n_unique(self) -> int:
        return len(self.points)

    def to_json(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(names) if names else [f"w{i}" for i in range(len(self.weights))]
        return {"method": self.method, "names": names, "weights": dict(zip(names, self.weights, strict=True)),
                "weight_vector": self.weights, "aggregate": self.aggregate, "scores": self.scores,
                "points": self.n_unique, "decoded": self.n_decoded, "reused_direction": self.n_reused,
                "from_log": self.n_cached,
                "rounds": [{"round": r.index, "lo": r.lo, "hi": r.hi, "kept_offset": r.kept_offset,
                            "best_weights": r.best_weights, "best_aggregate": r.best_aggregate}
                           for r in self.rounds]}


def expected_evaluations(dim: int, iterations: int) -> int:
    """Unique points of a hierarchical search: 3^d + (n - 1)(3^d - 2^d)."""
    return 3**dim + (iterations - 1) * (3**dim - 2**dim)


def check_search_args(dim: int, iterations: int) -> None:
    if not isinstance(dim, int | np.integer) or dim < 1:
        raise EmorlError(f"the search needs at least one objective (dim >= 1), got dim={dim!r}: train or list "
                         f"at least one adapter")
    if not isinstance(iterations, int | np.integer) or iterations < 1:
        raise EmorlError(f"iterations must be >= 1 (the final resolution is 2^-iterations per axis), "
                         f"got {iterations!r}")


def box_grid(lo: np.ndarray, side: float) -> np.ndarray:
    """The 3^d grid of a box: on every axis its lower edge, midpoint and upper edge. Shape (3,)*d + (d,)."""
    axes = [lo_i + side * np.array([0.0, 0.5, 1.0]) for lo_i in lo]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def best_subcube(scores: np.ndarray) -> tuple[int, ...]:
    """Of the 2^d sub-cubes of a 3^d grid, the one whose 2^d corner scores sum highest (first on ties).

    ``scores`` has shape (3,)*d; a sub-cube is named by its offset o in {0,1}^d and its corners are the grid
    indices o + {0,1}^d.
    """
    d = scores.ndim
    best, best_sum = None, -np.inf
    for offset in itertools.product((0, 1), repeat=d):
        corners = scores[tuple(slice(o, o + 2) for o in offset)]
        total = corners.sum()
        if best is None or total > best_sum:
            best, best_sum = offset, total
    assert best is not None
    return best


def hierarchical_search(objective: Callable[[np.ndarray], Sequence[Any]], dim: int, iterations: int = 5, *,
                        scale_invariant: bool = False, store: Any = None, progress: bool = True,
                        batch_points: int = 8, desc: str = "hierarchical search", box: float = 1.0) -> SearchResult:
    """Search the weight box [0, box]^dim for the point that maximises ``objective``.

    ``objective`` takes an (n, dim) array of weight points and returns n scores (numbers, or dicts
    ``{"aggregate": float, "scores": {name: float}}``). ``scale_invariant=True`` declares that the objective
    only depends on the direction of w (hidden/logits mixing under greedy decoding): each ray is then
    scored once and the all-zero point is never decoded. ``store`` (a :class:`PointStore`) logs every point
    and supplies the points of an interrupted run, which are not scored again.
    """
    check_search_args(dim, iterations)
    ev = Evaluator(objective, dim, scale_invariant=scale_invariant, store=store, batch_points=batch_points,
                   progress=progress, total=expected_evaluations(dim, iterations), desc=desc)
    rounds: list[Round] = []
    lo, side = np.zeros(dim), float(box)  # the box [0, box]^d
    try:
        for r in range(iterations):
            grid = box_grid(lo, side)  # 3 points per axis
            scores = ev.evaluate(grid.reshape(-1, dim), round=r).reshape((3,) * dim)
            offset = best_subcube(scores)  # the sub-cube whose corners sum highest
            best = ev.best()
            rounds.append(Round(r, lo.tolist(), side, list(offset), list(best.weights), best.aggregate))
            lo, side = lo + np.array(offset) * side / 2, side / 2  # halve the box to it
    finally:
        ev.close()
    return _result("hierarchical", ev, rounds)


def _result(method: str, ev: Evaluator, rounds: list[Round]) -> SearchResult:
    best = ev.best()
    return SearchResult(method=method, weights=list(best.weights), aggregate=best.aggregate, scores=dict(best.scores),
                        points=ev.records(), rounds=rounds, n_decoded=ev.n_decoded, n_reused=ev.n_reused,
                        n_cached=ev.n_cached, objective_calls=ev.objective_calls)
