"""The honest comparison on the test split: router vs the anchored search's global weights (the EMORL weights the
study reports) vs the uniform mix vs the per-prompt oracle (the best lattice point of each test prompt, chosen with
the test scores: an upper bound). Every method mixes by the base-anchored rule.

Every method is decoded inside the router's groups of prompts (one multi-point ``generate`` per group and seed:
router, global, uniform and every lattice point), so all methods share their random numbers prompt by prompt.
Confidence intervals: a paired bootstrap that resamples prompts, each with all its seeds. Writes
``RUN/router/compare.json`` and ``RUN/router/weights.png`` (the router's weights over the test prompts on the
simplex, coloured by prompt cluster).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from emorl.decoding import groups
from emorl.router.data import ANCHOR, box_lattice
from emorl.stats import draws, resampled_means
from emorl.utils import atomic_write_json

log = logging.getLogger("emorl.route")
METHODS = ("router", "global", "uniform", "oracle")


def paired_bootstrap(values: dict[str, np.ndarray], *, reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean and 95% percentile CI of each method and of each difference, resampling the same prompts for every
    method, each prompt with all its seeds (``values[m]``: (seeds, prompts), one value per pair)."""
    names = list(values)
    shape = np.shape(values[names[0]])
    x = np.stack([np.asarray(values[m], dtype=np.float64).ravel() for m in names])  # (M, N), (seed, prompt) order
    prompts = np.tile(np.arange(shape[-1]), int(np.prod(shape[:-1])))
    boot = resampled_means(x, draws(x.shape[1], reps, seed, prompts))  # (M, reps)

    def ci(row: np.ndarray, point: float) -> dict[str, float]:
        lo, hi = np.percentile(row, [2.5, 97.5])
        return {"mean": float(point), "lo": float(lo), "hi": float(hi)}

    out: dict[str, Any] = {m: ci(boot[i], x[i].mean()) for i, m in enumerate(names)}
    for a, b in (("router", "global"), ("router", "uniform"), ("oracle", "global"), ("oracle", "router")):
        if a in names and b in names:
            i, j = names.index(a), names.index(b)
            out[f"{a}-{b}"] = ci(boot[i] - boot[j], x[i].mean() - x[j].mean())
    if {"router", "global", "oracle"} <= set(names):
        r, g, o = (names.index(m) for m in ("router", "global", "oracle"))
        gap = boot[o] - boot[g]
        share = np.where(gap > 1e-12, (boot[r] - boot[g]) / np.where(gap > 1e-12, gap, 1.0), np.nan)
        total = x[o].mean() - x[g].mean()
        point = (x[r].mean() - x[g].mean()) / total if total > 1e-12 else float("nan")
        ok = share[np.isfinite(share)]
        out["gap_closed"] = {"mean": float(point), "lo": float(np.percentile(ok, 2.5)) if len(ok) else float("nan"),
                             "hi": float(np.percentile(ok, 97.5)) if len(ok) else float("nan")}
    return out


def score_table(ens: Any, prompts: list[str], router_w: np.ndarray, extra: np.ndarray, rewards: dict[str, Any],
                gen: Any, seeds: list[int], mode: str = "hidden") -> np.ndarray:
    """(1 + E, S, B, O) scores: row 0 the router's own weights, then every point of ``extra`` (E×K), decoded per
    router group and seed in one multi-point call."""
    from emorl.decoding import generation_kwargs
    from emorl.rewards import score

    out = np.zeros((1 + len(extra), len(seeds), len(prompts), len(rewards)))
    for w, idx in groups(router_w):
        pts = np.vstack([w[None], extra])
        sub = [prompts[i] for i in idx]
        for si, seed in enumerate(seeds):
            res = ens.generate(sub, pts, mode=mode, seed=seed, anchor=ANCHOR, **generation_kwargs(gen))
            flat = [t for g in res.all_texts for t in g]
            for oi, rw in enumerate(rewards.values()):
                out[:, si, idx, oi] = score(rw, sub * len(pts), flat).reshape(len(pts), len(sub))
    return out


def summarise(table: np.ndarray, objectives: list[str], objective_weights: np.ndarray, *, reps: int = 2000,
              seed: int = 0) -> dict[str, Any]:
    """Bootstrap report from a ``score_table`` laid out [router, global, uniform, lattice...]."""
    agg = np.einsum("psbo,o->psb", table, objective_weights)  # (P, S, B)
    oracle_idx = 3 + agg[3:].mean(1).argmax(0)  # per prompt, the best lattice point by its mean over seeds
    b = np.arange(table.shape[2])

    def pick(t: np.ndarray) -> dict[str, np.ndarray]:  # t: (P, S, B) -> method -> (S, B)
        return {"router": t[0], "global": t[1], "uniform": t[2], "oracle": t[oracle_idx, :, b].T}

    out = {"mean_reward": paired_bootstrap(pick(agg), reps=reps, seed=seed)}
    for oi, o in enumerate(objectives):
        out[o] = paired_bootstrap(pick(table[..., oi]), reps=reps, seed=seed)
    return out


def compare_run(run: str | Path, cfg: Any, *, base: Any = None, rewards: dict[str, Any] | None = None,
                prompts: list[str] | None = None, seeds: list[int] | None = None, reps: int = 2000,
                figure: bool = True) -> dict[str, Any]:
    """Decode and score the four methods on the test split; write ``RUN/router/compare.json`` (+ the figure)."""
    from emorl.ensemble.model import EnsembleModel
    from emorl.methods import decode_seeds, ensemble_objectives, eval_prompts
    from emorl.router.decode import route
    from emorl.router.run import MODE
    from emorl.search.objective import aggregate_weights

    run = Path(run)
    names = ensemble_objectives(cfg)
    if base is None:
        from emorl.models import load_base

        base = load_base(cfg.model)
    ens = EnsembleModel(base, {n: run / "adapters" / n for n in names})
    if rewards is None:
        from emorl.rewards import build_rewards

        rewards = build_rewards(cfg.objectives, base)
    rewards = {o: rewards[o] for o in cfg.objectives}
    prompts = prompts or eval_prompts(cfg, "test")
    seeds = seeds or decode_seeds(cfg)
    w, far, meta = route(run, ens, prompts)
    lat = box_lattice(len(names), cfg.route.step, cfg.search.w_max)
    glob = np.asarray(meta["global_weights"], dtype=np.float64)  # the anchored search's best, else best lattice pt
    extra = np.vstack([glob[None], np.full((1, len(names)), 1 / len(names)), lat])
    table = score_table(ens, prompts, w, extra, rewards, cfg.eval.generation, seeds, MODE)
    ow = aggregate_weights(list(rewards), cfg.search.objective_weights)
    report = {"split": "test", "prompts": len(prompts), "seeds": seeds, "pairs": len(prompts) * len(seeds),
              "rule": "base-anchored", "bootstrap": "paired, resampling prompts (each with all its seeds)",
              "router": {"method": meta["method"], "fallback": int(far.sum()), "distinct_weights": len(groups(w))},
              "global_weights": extra[0].tolist(), "global_source": meta["fit"].get("global_source"),
              "lattice_points": len(lat),
              "results": summarise(table, list(rewards), ow, reps=reps, seed=cfg.route.seed),
              "weights": [{"prompt": p, "weights": dict(zip(names, map(float, wi), strict=True)), "fallback": bool(f)}
                          for p, wi, f in zip(prompts, w, far, strict=True)]}
    atomic_write_json(run / "router" / "compare.json", report)
    if figure and len(names) == 3:
        from emorl.router.store import embed

        weights_figure(w, embed(prompts, str(ens.device)), names, run / "router" / "weights.png", seed=cfg.route.seed)
    return report


def weights_figure(w: np.ndarray, emb: np.ndarray, names: list[str], path: Path, *, clusters: int = 3,
                   seed: int = 0) -> None:
    """Ternary scatter of the directions of K=3 weight vectors, coloured by a k-means cluster of the prompts'
    embeddings."""
    from matplotlib.figure import Figure
    from sklearn.cluster import KMeans

    from emorl.search.plots import save_figure

    n = min(clusters, len(emb))
    lab = KMeans(n_clusters=n, n_init=10, random_state=seed).fit_predict(emb) if n > 1 else np.zeros(len(emb), int)
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    total = w.sum(axis=1, keepdims=True)
    xy = (w / np.where(total > 0, total, 1.0)) @ corners  # the direction of an anchored point (w = 0: a corner)
    jitter = np.random.default_rng(seed).normal(0, 0.008, xy.shape)
    fig = Figure(figsize=(5, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(*np.vstack([corners, corners[:1]]).T, color="0.4", lw=1)
    for c, name in zip(corners, names, strict=True):
        ax.annotate(name, c, textcoords="offset points", xytext=(0, -14 if c[1] == 0 else 6), ha="center")
    sc = ax.scatter(*(xy + jitter).T, c=lab, cmap="viridis", s=28, alpha=0.8, edgecolor="k", lw=0.3)
    ax.legend(*sc.legend_elements(), title="prompt cluster", loc="upper right", fontsize=8)
    ax.set_title("router weight directions (w / sum w) over the test prompts")
    ax.set_aspect("equal")
    ax.axis("off")
    save_figure(fig, path)
