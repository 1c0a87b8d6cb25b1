"""The search objective: decode a fixed validation subset with the ensemble for a batch of weight points,
score the replies with every objective's reward, and return per-objective means and their aggregate.

Every point is decoded on the same prompts with the same seed, so scores of different points are
comparable (the reference code drew a new random validation subset at each evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from emorl.config import GenerationConfig
from emorl.ensemble.mixing import MODES
from emorl.search.evaluator import Score
from emorl.utils import EmorlError


def is_scale_invariant(mode: str, anchor: str = "base") -> bool:
    """Convex mixes (``anchor="none"``, and ``probs``) decode w / sum(w): only the direction counts, greedy or
    sampled (every point draws the same random numbers), so the search scores each direction once. Anchored mixes
    use w as given (its scale is each adapter's strength)."""
    from emorl.ensemble.mixing import is_scale_invariant as rule

    return rule(mode, anchor)


def search_seeds(seeds: Sequence[int], generation: GenerationConfig) -> list[int]:
    """Decoding seeds of one point: every seed under sampling (their scores are averaged, per prompt), the first
    alone under greedy decoding (which does not depend on the seed)."""
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise EmorlError("search.seeds: give at least one seed, e.g. search.seeds=[0,1,2]")
    return seeds if generation.do_sample else seeds[:1]


def aggregate_weights(objectives: Sequence[str], objective_weights: Sequence[float] | None) -> np.ndarray:
    """Normalised weights of the objectives in the aggregate (default: the plain mean)."""
    if objective_weights is None:
        return np.full(len(objectives), 1.0 / len(objectives))
    w = np.asarray(objective_weights, dtype=float)
    if w.shape != (len(objectives),):
        raise EmorlError(f"search.objective_weights: {len(w)} weights given for {len(objectives)} objectives "
                         f"({', '.join(objectives)}); give one weight per objective, in that order")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise EmorlError(f"search.objective_weights: {list(w)} must be finite, non-negative and not all zero")
    return w / w.sum()


class EnsembleObjective:
    """``objective(points) -> [Score]`` for :func:`hierarchical_search`, decoding with an EnsembleModel.

    ``ensemble`` needs ``.names`` (its K adapters, the axes of a weight point) and ``.generate(prompts,
    weights=(G, K), mode=..., ...)`` returning G lists of replies. ``rewards`` maps objective name to
    reward (see :mod:`emorl.rewards`); the aggregate is their ``objective_weights``-weighted mean. Under sampling
    each point is decoded once per seed of ``seeds`` (default ``[seed]``) and a prompt's score is its mean over
    them; every point draws the same random numbers (common random numbers), so points stay comparable.
    """

    def __init__(self, ensemble: Any, prompts: Sequence[str], rewards: dict[str, Any], *, mode: str = "hidden",
                 generation: GenerationConfig | None = None, seed: int = 0,
                 objective_weights: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
                 anchor: str = "base") -> None:
        if mode not in MODES:
            raise EmorlError(f"search mode {mode!r} is not one of {', '.join(MODES)}")
        if not prompts:
            raise EmorlError("the search needs at least one validation prompt (search.prompts >= 1 and a "
                             "non-empty validation split)")
        if not rewards:
            raise EmorlError("the search needs at least one objective reward")
        self.ensemble = ensemble
        self.prompts = list(prompts)
        self.rewards = dict(rewards)
        self.names = list(ensemble.names)
        self.mode = mode
        self.anchor = anchor
        self.generation = generation or GenerationConfig(do_sample=False)
        self.seed = seed
        self.seeds = search_seeds(seeds if seeds is not None else [seed], self.generation)
        self.weights = aggregate_weights(list(self.rewards), objective_weights)
        self.points_decoded = 0

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def scale_invariant(self) -> bool:
        return is_scale_invariant(self.mode, self.anchor)

    def __call__(self, points: np.ndarray) -> list[Score]:
        points = np.asarray(points, dtype=np.float64)
        per_seed = [self._call_seed(points, seed) for seed in self.seeds]
        return [self._average([p[i] for p in per_seed]) for i in range(len(points))]

    def _call_seed(self, points: np.ndarray, seed: int) -> list[Score]:
        from emorl.decoding import generation_kwargs

        # w = 0 of a convex mix is degenerate (no direction, not a candidate); anchored, it is the base model
        zero = ~(points > 0).any(axis=1) if self.scale_invariant else np.zeros(len(points), dtype=bool)
        texts: list[list[str]] = [[] for _ in range(len(points))]
        live = np.flatnonzero(~zero)
        if len(live):
            out = self.ensemble.generate(self.prompts, weights=points[live], mode=self.mode, seed=seed,
                                         anchor=self.anchor, **generation_kwargs(self.generation))
            groups = out.all_texts if hasattr(out, "all_texts") else out
            if len(groups) != len(live) or any(len(t) != len(self.prompts) for t in groups):
                raise EmorlError(f"the ensemble returned {len(groups)} groups of replies for {len(live)} weight "
                                 f"points x {len(self.prompts)} prompts")
            for i, group in zip(live, groups, strict=True):
                texts[i] = list(group)
            self.points_decoded += len(live)
        scores = self.score_replies([texts[i] for i in live]) if len(live) else []
        result = [self.degenerate()] * len(points)
        for i, sc in zip(live, scores, strict=True):
            result[i] = sc
        return result

    def _average(self, scores: list[Score]) -> Score:
        """One point's scores over seeds: per prompt, the mean over seeds; then the means as for one seed."""
        if len(scores) == 1 or not math.isfinite(scores[0].aggregate):  # one seed, or the degenerate point
            return scores[0]
        per_prompt = {n: np.mean([s.per_prompt[n] for s in scores], axis=0) for n in self.rewards}
        means = {n: float(v.mean()) for n, v in per_prompt.items()}
        agg = float(np.array([means[n] for n in self.rewards]) @ self.weights)
        return Score(agg, means, {n: v.tolist() for n, v in per_prompt.items()})

    def score_replies(self, texts: Sequence[Sequence[str]]) -> list[Score]:
        """Scores of G groups of replies (one group per weight point, one reply per prompt): each reward is
        called once on all G x B pairs, then averaged per point."""
        from emorl.rewards import score

        n_pts, n_prompts = len(texts), len(self.prompts)
        flat = [r for group in texts for r in group]
        table = {name: score(rw, self.prompts * n_pts, flat).reshape(n_pts, n_prompts)
                 for name, rw in self.rewards.items()}
        means = {n: t.mean(1) for n, t in table.items()}
        agg = np.stack([means[n] for n in self.rewards], axis=1) @ self.weights
        return [Score(float(agg[i]), {n: float(means[n][i]) for n in self.rewards},
                      {n: [float(x) for x in table[n][i]] for n in self.rewards}) for i in range(n_pts)]

    def degenerate(self) -> Score:
        """The all-zero point of a convex mix: w / Σw is undefined, no adapter contributes and nothing sensible is
        decoded, so it is no candidate: it scores −inf (never the best point, whatever a reward thinks of an empty
        reply; scoring it as empty replies let a reward that likes "" pick a point ``check_weights`` refuses).
        The sub-cube at the origin is then never kept, which loses nothing: its corners are the same directions
        as the whole box's."""
        return Score(-math.inf)


def build_objective(ensemble: Any, prompts: Sequence[str], rewards: dict[str, Any], key: str, search: Any,
                    seeds: Sequence[int] | None = None) -> EnsembleObjective:
    """The objective of search key ``key`` (e.g. ``hidden``, ``params-convex``) with a SearchConfig's settings."""
    from emorl.decoding import parse_mix

    mode, anchor = parse_mix(key, search.anchor)
    return EnsembleObjective(ensemble, prompts, rewards, mode=mode, anchor=anchor, generation=search.generation,
                             seed=search.seed, objective_weights=search.objective_weights,
                             seeds=search.seeds if seeds is None else seeds)
