"""Weight search: find the mixing weights of the K adapters that maximise the validation score.

* :func:`hierarchical_search` — the paper's hierarchical grid, any number of objectives, memoised,
  batched, resumable; :func:`grid_search` and :func:`random_search` as comparators.
* :class:`EnsembleObjective` — decodes a fixed validation subset with the ensemble for a batch of weight
  points and scores it with every objective's reward.
* :class:`PointStore` — ``RUN/search/<mode>/points.jsonl`` and ``best.json``; :mod:`emorl.search.plots`.
"""

from emorl.search.baselines import full_grid, grid_search, random_search
from emorl.search.evaluator import Evaluator, PointRecord, Score
from emorl.search.hierarchical import (
    Round,
    SearchResult,
    best_subcube,
    box_grid,
    expected_evaluations,
    hierarchical_search,
)
from emorl.search.store import PointStore, adapter_identity

__all__ = [
    "Evaluator",
    "PointRecord",
    "PointStore",
    "Round",
    "Score",
    "SearchResult",
    "adapter_identity",
    "best_subcube",
    "box_grid",
    "expected_evaluations",
    "full_grid",
    "grid_search",
    "hierarchical_search",
    "random_search",
]
