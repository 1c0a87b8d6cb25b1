"""Decode a lattice of weight points for one mixing mode and score every reply per (prompt, seed) unit.

The lattice is the protocol of PARM and Rewards-in-Context: an evenly spaced grid {0, step, ..., w_max}^K without
the all-zero point, plus the mode's searched point. Points are decoded ``batch_points`` at a time in the batched
multi-point path (``EnsembleModel.generate`` with a G×K weights matrix), on the evaluation's prompts, seeds and
decoding settings, so each point's per-unit scores pair with every evaluated method's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from emorl.config import GenerationConfig


def box_lattice(n_adapters: int, step: float, w_max: float) -> np.ndarray:
    """Every point of {0, step, ..., w_max}^K except the origin, in lexicographic order."""
    n = int(round(w_max / step))
    axis = [round(i * step, 10) for i in range(n + 1)]
    pts = [p for p in itertools.product(axis, repeat=n_adapters) if any(p)]
    return np.array(pts, dtype=float).reshape(-1, n_adapters)


def _ray(w: Sequence[float]) -> tuple[Fraction, ...]:
    m = Fraction(max(w)).limit_denominator(10**6)
    return tuple(Fraction(x).limit_denominator(10**6) / m for x in w)


def decode_groups(points: np.ndarray, scale_invariant: bool) -> list[int]:
    """For every point, the index of the point whose decode it shares: itself, or (scale-invariant mixes) the first
    point on the same ray, whose replies are the same."""
    first: dict[Any, int] = {}
    out = []
    for i, w in enumerate(points):
        key = _ray(w) if scale_invariant else tuple(w)
        out.append(first.setdefault(key, i))
    return out


def score_lattice(ensemble: Any, points: np.ndarray, prompts: Sequence[str], seeds: Sequence[int],
                  rewards: dict[str, Any], gen: GenerationConfig, *, mode: str, anchor: str = "base",
                  batch_points: int = 16, progress: Any = None) -> np.ndarray:
    """Per-unit scores (points, seeds × prompts, objectives) of every lattice point, units in (seed, prompt) order.

    ``anchor`` is the weight rule (emorl.ensemble.mixing.weight_rule): a convex mix decodes w / sum(w), so points on
    one ray share a decode."""
    from emorl.decoding import generation_kwargs
    from emorl.ensemble.mixing import is_scale_invariant
    from emorl.rewards import score

    groups = decode_groups(points, is_scale_invariant(mode, anchor))
    todo = sorted(set(groups))
    objectives = list(rewards)
    n_units = len(prompts) * len(seeds)
    decoded = np.zeros((len(points), n_units, len(objectives)))
    kw = generation_kwargs(gen)
    for s_i, seed in enumerate(seeds):
        for c in range(0, len(todo), batch_points):
            idx = todo[c:c + batch_points]
            res = ensemble.generate(list(prompts), weights=points[idx], mode=mode, seed=seed, anchor=anchor, **kw)
            texts = res.all_texts if hasattr(res, "all_texts") else res
            flat = [t for group in texts for t in group]
            for j, o in enumerate(objectives):
                vals = score(rewards[o], list(prompts) * len(idx), flat).reshape(len(idx), len(prompts))
                decoded[idx, s_i * len(prompts):(s_i + 1) * len(prompts), j] = vals
            if progress is not None:
                progress(len(idx))
    return decoded[groups]
