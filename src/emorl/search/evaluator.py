"""What every search method shares: scoring weight points once each, in batches, with a log.

:class:`Evaluator` turns "score these grid points" into the fewest objective calls:

* a point already scored (in this run or in the resumed ``points.jsonl``) is looked up, never re-scored;
* under a scale-invariant decode (hidden/logits mixing, greedy), a point on a ray already scored reuses
  that score, and the all-zero point is never decoded (it is scored by the objective's ``degenerate()``);
* the remaining points are scored ``batch_points`` at a time, and each batch is appended to the log before
  the next one starts, so an interrupted search loses at most one batch.

Keys are exact: the hierarchical grid is dyadic (every coordinate is k / 2^n, exact in binary floating
point), and directions are compared as exact fractions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from emorl.utils import EmorlError

Key = tuple[float, ...]


@dataclass
class Score:
    """The score of one weight point: the aggregate the search maximises, and the per-objective means."""

    aggregate: float
    scores: dict[str, float] = field(default_factory=dict)
    per_prompt: dict[str, list[float]] = field(default_factory=dict)  # objective -> per-prompt mean over seeds


@dataclass
class PointRecord:
    """One evaluated point as kept in memory and in ``points.jsonl``."""

    weights: Key
    aggregate: float
    scores: dict[str, float]
    round: int
    source: str  # "decoded" | "direction" (score reused from a point on the same ray) | "degenerate"
    time: float  # unix time at which it was scored
    seconds: float = 0.0  # this point's share of its batch's wall time
    per_prompt: dict[str, list[float]] = field(default_factory=dict)  # objective -> scores in the header's prompt order

    def to_json(self) -> dict[str, Any]:
        agg = self.aggregate if math.isfinite(self.aggregate) else None
        out = {"weights": list(self.weights), "aggregate": agg, "scores": self.scores, "round": self.round,
               "source": self.source, "time": round(self.time, 3), "seconds": round(self.seconds, 4)}
        if self.per_prompt:
            out["per_prompt"] = {k: [round(float(x), 6) for x in v] for k, v in self.per_prompt.items()}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PointRecord:
        agg = d.get("aggregate")
        return cls(weights=tuple(float(x) for x in d["weights"]), aggregate=-math.inf if agg is None else float(agg),
                   scores={k: float(v) for k, v in (d.get("scores") or {}).items()}, round=int(d.get("round", 0)),
                   source=str(d.get("source", "decoded")), time=float(d.get("time", 0.0)),
                   seconds=float(d.get("seconds", 0.0)),
                   per_prompt={k: [float(x) for x in v] for k, v in (d.get("per_prompt") or {}).items()})


def direction(w: Key) -> tuple[Fraction, ...]:
    """The ray through ``w`` as exact fractions (w / max w): equal for w and c·w, c > 0."""
    m = Fraction(max(w))
    return tuple(Fraction(x) / m for x in w)


def as_score(value: Any, where: str) -> Score:
    """Accept what an objective may return for one point: a number, a Score, or {"aggregate", "scores"}."""
    if isinstance(value, Score):
        s = value
    elif isinstance(value, dict):
        if "aggregate" not in value:
            raise EmorlError(f"objective returned {value!r} for {where}: a dict needs an 'aggregate' key")
        s = Score(float(value["aggregate"]), {k: float(v) for k, v in (value.get("scores") or {}).items()},
                  {k: [float(x) for x in v] for k, v in (value.get("per_prompt") or {}).items()})
    else:
        s = Score(float(value))
    if math.isnan(s.aggregate):
        raise EmorlError(f"objective returned NaN for {where}; check the rewards (a reward that fails on some "
                         f"reply) or the objective weights")
    return s


class Evaluator:
    """Scores batches of weight points with memo, direction dedup, batching, a log and a progress bar.

    ``objective(points: (n, d) array) -> sequence of n scores`` (numbers, :class:`Score` or dicts). An
    objective may define ``degenerate() -> score`` for the all-zero point of a scale-invariant decode;
    without it that point scores -inf (never best, its sub-cubes never kept).
    """

    def __init__(self, objective: Callable[[np.ndarray], Sequence[Any]], dim: int, *, scale_invariant: bool = False,
                 store: Any = None, batch_points: int = 8, progress: bool = True, total: int | None = None,
                 desc: str = "search") -> None:
        if batch_points < 1:
            raise EmorlError(f"batch_points must be >= 1, got {batch_points}")
        self.objective = objective
        self.dim = dim
        self.scale_invariant = scale_invariant
        self.store = store
        self.batch_points = batch_points
        self.memo: dict[Key, PointRecord] = {}
        self.rays: dict[tuple[Fraction, ...], PointRecord] = {}
        self.order: list[Key] = []  # keys in the order the search asked for them (first time only)
        self._asked: set[Key] = set()
        self._best: PointRecord | None = None
        self._best_seen = -math.inf  # for the progress bar only
        self.n_decoded = 0  # points passed to the objective in this process
        self.n_reused = 0  # points answered from another point on the same ray
        self.n_cached = 0  # points answered from the resumed log
        self.objective_calls = 0
        if store is not None:
            for rec in store.records():
                self._remember(rec)
        self._bar = None
        if progress:
            from emorl.progress import progress_bar

            self._bar = progress_bar(total, desc, unit="pt")

    # -------------------------------------------------------------------------------------- public

    def evaluate(self, points: np.ndarray, round: int = 0) -> np.ndarray:  # noqa: A002 - the paper's word
        """Aggregate scores of ``points`` ((n, d) array), scoring only what has never been scored."""
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise EmorlError(f"weight points must be an (n, {self.dim}) array, got shape {points.shape}")
        keys = [tuple(float(x) for x in p) for p in points]
        todo: list[Key] = []
        waiting: list[Key] = []  # on the same ray as a point in `todo`: answered once that one is scored
        pending_rays: set[tuple[Fraction, ...]] = set()
        for k in keys:
            if k in self.memo:
                if k not in self._asked:
                    self.n_cached += 1
                    self._tick(1)
            elif k in todo or k in waiting:
                continue
            elif self.scale_invariant and not any(k):
                self._add(PointRecord(k, *self._degenerate(), round=round, source="degenerate", time=time.time()))
            elif self.scale_invariant and direction(k) in self.rays:
                self._reuse(k, round)
            elif self.scale_invariant and direction(k) in pending_rays:
                waiting.append(k)
            else:
                if self.scale_invariant:
                    pending_rays.add(direction(k))
                todo.append(k)
        for i in range(0, len(todo), self.batch_points):
            self._score_batch(todo[i:i + self.batch_points], round)
        for k in waiting:
            self._reuse(k, round)
        for k in keys:  # the canonical order (and tie-breaking) is the order asked, whatever was cached or reused
            if k not in self._asked:
                self._ask(k)
        return np.array([self.memo[k].aggregate for k in keys])

    def best(self) -> PointRecord:
        """The best point asked for so far; ties go to the point asked for first (stable across resumes)."""
        if self._best is None:
            raise EmorlError("no point was evaluated")
        return self._best

    def records(self) -> list[PointRecord]:
        """Every point this search asked for, in the order asked."""
        return [self.memo[k] for k in self.order]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------------------------- internals

    def _ask(self, k: Key) -> None:
        self._asked.add(k)
        self.order.append(k)
        rec = self.memo[k]
        if self._best is None or rec.aggregate > self._best.aggregate:
            self._best = rec

    def _remember(self, rec: PointRecord) -> None:
        self.memo[rec.weights] = rec
        self._best_seen = max(self._best_seen, rec.aggregate)
        if self.scale_invariant and any(rec.weights) and rec.source != "degenerate":
            self.rays.setdefault(direction(rec.weights), rec)

    def _reuse(self, k: Key, round: int) -> None:  # noqa: A002
        src = self.rays[direction(k)]
        self._add(PointRecord(k, src.aggregate, dict(src.scores), round, "direction", time.time(),
                              per_prompt=src.per_prompt))
        self.n_reused += 1

    def _add(self, rec: PointRecord) -> None:
        self._remember(rec)
        if self.store is not None:
            self.store.append(rec)
        self._tick(1)

    def _degenerate(self) -> tuple[float, dict[str, float]]:
        if not hasattr(self, "_degenerate_score"):
            fn = getattr(self.objective, "degenerate", None)
            self._degenerate_score = as_score(fn(), "the all-zero point") if fn else Score(-math.inf)
        s = self._degenerate_score
        return s.aggregate, dict(s.scores)

    def _score_batch(self, keys: list[Key], round: int) -> None:  # noqa: A002
        t0 = time.perf_counter()
        values = self.objective(np.array(keys, dtype=np.float64))
        self.objective_calls += 1
        values = list(values)
        if len(values) != len(keys):
            raise EmorlError(f"objective returned {len(values)} scores for {len(keys)} weight points")
        dt = (time.perf_counter() - t0) / len(keys)
        now = time.time()
        scored = [as_score(v, f"weights {list(k)}") for k, v in zip(keys, values, strict=True)]
        recs = [PointRecord(k, s.aggregate, s.scores, round=round, source="decoded", time=now, seconds=dt,
                            per_prompt=s.per_prompt) for k, s in zip(keys, scored, strict=True)]
        self.n_decoded += len(keys)
        if self.store is not None:
            self.store.extend(recs)
        for r in recs:
            self._remember(r)
        self._tick(len(recs))

    def _tick(self, n: int) -> None:
        if self._bar is None:
            return
        self._bar.update(n)
        self._bar.set_postfix(best=f"{self._best_seen:.4f}", decoded=self.n_decoded, refresh=False)
