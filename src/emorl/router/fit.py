"""The router: client statement -> mixing weights, from the statement's MiniLM embedding.

Two predictors over the training prompts' unit-norm embeddings E and their per-point aggregate scores:

* ``knn``: the mean of the best weight points of the ``k`` nearest neighbours: the training prompts most similar
  (cosine) to the prompt.
* ``ridge``: a ridge regression from the embedding to every lattice point's score; the argmax point.

``method="auto"`` keeps the one with the higher cross-validated reward (``folds`` folds over the lattice prompts,
seeded); a knn prediction off the lattice is scored as its nearest lattice point (L1), which the fit records. When
one global point (the best lattice point of the training folds) scores higher held out than both, per-prompt
weights do not pay on these data and ``auto`` chooses ``global``: every prompt gets the global weights, so
``--weights auto`` is never expected to do worse than the plain EMORL weights.

The weights are base-anchored points of the box [0, w_max]^K (a mean of such points stays in the box).

**Fallback rule**: with d(x) = 1 − max cosine between x and the training prompts, a prompt with d(x) > τ gets the
global weights, where τ is the ``fallback_percentile`` (95) percentile of every training prompt's distance to its
nearest *other* training prompt. The global weights are the anchored search's best point (the EMORL weights)
where given, else the lattice point with the best mean score over the training prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emorl.router.data import RouterData
from emorl.utils import EmorlError

METHODS = ("knn", "ridge")


@dataclass
class Router:
    names: list[str]
    method: str
    emb: np.ndarray  # (N, d) unit-norm embeddings of the training prompts (all blocks)
    best: np.ndarray  # (N, K) each training prompt's best weight point
    points: np.ndarray  # (P, K) lattice points (ridge's classes)
    global_weights: np.ndarray  # (K,)
    threshold: float  # fallback: cosine distance to the nearest training prompt
    k: int = 5  # knn: number of nearest neighbours (route.k), not adapters
    coef: np.ndarray | None = None  # ridge: (P, d)
    intercept: np.ndarray | None = None  # ridge: (P,)
    info: dict[str, Any] = field(default_factory=dict)

    def nearest_distance(self, e: np.ndarray) -> np.ndarray:
        return 1.0 - (np.asarray(e, dtype=np.float64) @ self.emb.T).max(axis=1)

    def predict(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights (B, K), fallback mask (B,)) for unit-norm embeddings ``e`` (B, d)."""
        e = np.atleast_2d(np.asarray(e, dtype=np.float64))
        far = self.nearest_distance(e) > self.threshold + 1e-9
        if self.method == "global":
            return np.repeat(self.global_weights[None], len(e), axis=0), far
        w = _knn(self.emb, self.best, e, self.k) if self.method == "knn" else \
            self.points[np.argmax(e @ self.coef.T + self.intercept, axis=1)]
        w = np.where(far[:, None], self.global_weights[None], w)
        return w, far


def _knn(emb: np.ndarray, best: np.ndarray, e: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    sims = e @ emb.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    k = min(k, emb.shape[0] - int(exclude_self))
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # ties: the earlier training prompt first
    return best[idx].mean(axis=1)


def _ridge(emb: np.ndarray, table: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import Ridge

    m = Ridge(alpha=alpha).fit(emb, table)
    return np.asarray(m.coef_, dtype=np.float64), np.asarray(m.intercept_, dtype=np.float64)


def nearest_point(w: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the lattice point nearest (L1) to each row of ``w`` (first one on ties)."""
    return np.abs(w[:, None, :] - points[None]).sum(-1).argmin(axis=1)


def fallback_threshold(emb: np.ndarray, percentile: float) -> float:
    if len(emb) < 2:
        return 0.0
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.percentile(1.0 - sims.max(axis=1), percentile))


def cross_validate(emb: np.ndarray, table: np.ndarray, points: np.ndarray, *, k: int, alpha: float, folds: int,
                   seed: int) -> dict[str, float]:
    """Mean held-out aggregate score of each method's choice (table: (N, P) scores of the lattice points), with the
    global best lattice point (fitted on the other folds) for reference."""
    n = len(emb)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    got = {m: np.zeros(n) for m in (*METHODS, "global")}
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        best = points[table[train].argmax(1)]
        got["knn"][test] = table[test, nearest_point(_knn(emb[train], best, emb[test], k), points)]
        c, b = _ridge(emb[train], table[train], alpha)
        got["ridge"][test] = table[test, np.argmax(emb[test] @ c.T + b, axis=1)]
        got["global"][test] = table[test, table[train].mean(0).argmax()]
    return {m: float(v.mean()) for m, v in got.items()}


def fit_router(data: RouterData, emb_blocks: list[np.ndarray], objective_weights: np.ndarray, *, method: str = "auto",
               k: int = 5, alpha: float = 1.0, folds: int = 5, percentile: float = 95.0, seed: int = 0,
               global_weights: np.ndarray | None = None) -> Router:
    """Fit on ``data`` (its blocks' embeddings in ``emb_blocks``, one (B_i, d) array per block); ``k``: knn's number
    of nearest neighbours."""
    if method not in (*METHODS, "auto"):
        raise EmorlError(f"route.method={method!r}: choose knn, ridge or auto")
    if k < 1 or folds < 2 or not 0 < percentile <= 100 or alpha < 0:
        raise EmorlError(f"route: need k >= 1, folds >= 2, 0 < fallback_percentile <= 100 and ridge_alpha >= 0 "
                         f"(got k={k}, folds={folds}, fallback_percentile={percentile}, ridge_alpha={alpha})")
    lat = data.lattice
    table = lat.aggregate(objective_weights)  # (B, P)
    if len(lat.prompts) < 2:
        raise EmorlError("route: the router needs scores of at least 2 training prompts")
    emb_all = np.vstack(emb_blocks).astype(np.float64)
    best_all = np.vstack([b.points[b.aggregate(objective_weights).argmax(1)] for b in data.blocks])
    cv = cross_validate(emb_blocks[0].astype(np.float64), table, lat.points, k=k, alpha=alpha, folds=folds, seed=seed)
    chosen = method if method != "auto" else max(METHODS, key=lambda m: (cv[m], m == "knn"))
    if method == "auto" and cv["global"] > cv[chosen]:  # per-prompt weights lose held out: one point for all
        chosen = "global"
    coef = intercept = None
    if chosen == "ridge":
        coef, intercept = _ridge(emb_blocks[0].astype(np.float64), table, alpha)
    gw = global_weights if global_weights is not None else lat.points[table.mean(0).argmax()]
    gw = np.asarray(gw, dtype=np.float64)
    thr = fallback_threshold(emb_all, percentile)
    info = {"cv": cv, "requested_method": method, "training_prompts": int(len(emb_all)),
            "lattice_prompts": len(lat.prompts), "global_source": "search" if global_weights is not None
            else "best lattice point on average", "threshold_rule": f"{percentile:g}th percentile of the training "
            "prompts' cosine distances to their nearest other training prompt"}
    return Router(list(data.names), chosen, emb_all, best_all, lat.points.copy(), gw, thr, k, coef, intercept, info)
