"""Re-evaluation of a search's top points: the cure for the winner's curse.

The search keeps the best of many noisy scores, so its winner's score is biased upwards (the winner is partly the
luckiest draw). Re-scoring its top-n points on more prompts and fresh seeds, and choosing by that score, selects on
a measurement independent of the noise that ranked them. ``best.json`` keeps both: the search's aggregate and the
re-evaluation's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from emorl.search.evaluator import PointRecord, Score, as_score, direction


def top_points(records: Sequence[PointRecord], n: int, scale_invariant: bool) -> list[PointRecord]:
    """The n best decodable points by search aggregate (ties: the one asked for first), one per direction when the
    decode is scale-invariant; all-zero and degenerate points are left out."""
    live = [r for r in records if any(r.weights) and r.source != "degenerate" and math.isfinite(r.aggregate)]
    ranked = sorted(range(len(live)), key=lambda i: (-live[i].aggregate, i))
    out: list[PointRecord] = []
    seen: set[Any] = set()
    for i in ranked:
        key = direction(live[i].weights) if scale_invariant else live[i].weights
        if key in seen:
            continue
        seen.add(key)
        out.append(live[i])
        if len(out) == n:
            break
    return out


def reevaluate(objective: Callable[[np.ndarray], Sequence[Any]], candidates: Sequence[PointRecord]
               ) -> tuple[int, list[Score]]:
    """Score ``candidates`` with ``objective`` (one call) and return the index of the best re-score (ties: the
    better search rank) and every re-score."""
    scores = [as_score(v, f"re-evaluated weights {list(c.weights)}")
              for v, c in zip(objective(np.array([c.weights for c in candidates], dtype=np.float64)), candidates,
                              strict=True)]
    best = max(range(len(scores)), key=lambda i: (scores[i].aggregate, -i))
    return best, scores


def reeval_payload(candidates: Sequence[PointRecord], scores: Sequence[Score], chosen: int, names: Sequence[str],
                   prompts: int, seeds: Sequence[int]) -> dict[str, Any]:
    return {"prompts": prompts, "seeds": list(seeds), "chosen": chosen,
            "points": [{"weights": dict(zip(names, c.weights, strict=True)), "search_aggregate": c.aggregate,
                        "search_scores": c.scores, "aggregate": s.aggregate, "scores": s.scores}
                       for c, s in zip(candidates, scores, strict=True)]}
