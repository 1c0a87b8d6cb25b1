"""Figures of a run's report (PNG, matplotlib's Agg canvas; no display needed).

* ``training_curves.png`` — validation reward against prompts consumed for every trained policy (the paper's
  training-curve figure): each EMORL adapter on its own objective, the one-policy baselines on the mean.
* ``results_scatter.png`` — prompts consumed in training against test mean reward, error bars = the paired
  bootstrap's 95% CI (std over decoding seeds for results without one): the paper's results scatter.
* ``tradeoffs.png`` — every pair of objectives: the methods' test scores (with 95% CIs) placed over the
  points the hidden-mixing search scored on validation prompts, with that search's Pareto front.
* ``search_modes.png`` — best validation aggregate after each round of the search, one line per mode.
* ``search_<mode>_<view>.png`` — the search's own views (history, landscape, trade-off, weights).

Every method has its family's colour and a marker of its own (``emorl.search.plots.method_styles``); legends sit
outside the axes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from emorl.search.plots import method_styles, pareto_mask, save_figure


def plot_training_curves(curves: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """``curves``: label -> {"method", "prompts": [...], "value": [...], "what": str, "converged": bool}.

    One line per trained policy; the last point is marked (a filled marker if the run converged, hollow if it
    stopped on its budget), as the paper marks where each run stops."""
    curves = {k: c for k, c in curves.items() if c.get("prompts")}
    if not curves:
        return None
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    ax = fig.subplots()
    # an EMORL adapter's curve is that adapter alone: the single-adapter family's colour, its own marker
    keys = {label: f"single:{label}" if c["method"] == "emorl" else c["method"] for label, c in curves.items()}
    styles = method_styles(list(keys.values()))
    for label, c in curves.items():
        color, marker = styles[keys[label]]
        x, y = np.asarray(c["prompts"], float), np.asarray(c["value"], float)
        ax.plot(x, y, "-" if c["method"] == "emorl" else "--", color=color, lw=1.6, marker=marker, ms=5,
                label=f"{label} ({c['what']})")
        ax.plot(x[-1], y[-1], marker, ms=11, color=color, mfc=color if c.get("converged") else "white", mew=1.6)
    ax.set_xlabel("training prompts consumed")
    ax.set_ylabel("validation reward (mean score)")
    ax.set_title("Validation reward during training\n(end of a run: filled = converged, hollow = budget spent)")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")
    return save_figure(fig, path)


def plot_results_scatter(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``rows``: {"method", "label", "prompts", "mean", "std", "ci95"}: one point per method with its error bar (the
    95% CI where every row has one, else the std over seeds)."""
    fig = Figure(figsize=(9.5, 5.2), layout="constrained")
    ax = fig.subplots()
    styles = method_styles([r["method"] for r in rows])
    with_ci = all(r.get("ci95") for r in rows)  # the paired-bootstrap 95% CI where the evaluation has it
    span = (max(r["prompts"] for r in rows) - min(r["prompts"] for r in rows)) or 1.0
    at_x: dict[float, list[str]] = {}
    for r in rows:  # methods with the same training cost stand side by side, not on top of one another
        at_x.setdefault(r["prompts"], []).append(r["method"])
    for r in rows:
        color, marker = styles[r["method"]]
        yerr = [[r["mean"] - r["ci95"][0]], [r["ci95"][1] - r["mean"]]] if with_ci else [r["std"]]
        group = at_x[r["prompts"]]
        dx = 0.012 * span * (group.index(r["method"]) - (len(group) - 1) / 2)
        ax.errorbar([r["prompts"] + dx], [r["mean"]], yerr=yerr, fmt=marker, color=color, ms=11 if marker == "*"
                    else 8, capsize=4, label=r["label"], mec="black", mew=0.6)
    ax.set_xlabel("training prompts consumed (mixes and soups: their K adapters' sum; equal costs side by side)")
    ax.set_ylabel("test mean reward (mean of the objectives)")
    n = max((r.get("n", 1) for r in rows), default=1)
    ax.set_title("Data consumed vs mean reward (error bars: 95% CI, paired bootstrap)" if with_ci else
                 f"Data consumed vs mean reward (error bars: std over {n} decoding seed{'s' * (n != 1)})")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    fig.legend(fontsize=8, loc="outside right upper")
    return save_figure(fig, path)


def plot_tradeoffs(objectives: Sequence[str], methods: Sequence[dict[str, Any]], path: str | Path,
                   search_points: np.ndarray | None = None) -> Path | None:
    """``methods``: {"method", "label", "mean": {obj: m}, "std": {obj: s}, "ci95": {obj: [lo, hi]}} (error bars:
    the CIs where every method has them, else the stds). ``search_points``: (n, d) per-objective validation scores
    of the hidden-mixing search, drawn grey behind with their Pareto front (pass them only when the evaluation
    decoded like the search, or the two sets of scores are not comparable)."""
    objs = list(objectives)
    if len(objs) < 2:
        return None
    pairs = list(itertools.combinations(range(len(objs)), 2))
    ncol = min(3, len(pairs))
    nrow = math.ceil(len(pairs) / ncol)
    fig = Figure(figsize=(5.2 * ncol, 4.8 * nrow + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    styles = method_styles([m["method"] for m in methods])
    with_ci = all(all((m.get("ci95") or {}).get(o) for o in objs) for m in methods)

    def err(m: dict[str, Any], o: str) -> list[Any]:
        if not with_ci:
            return [m["std"][o]]
        lo, hi = m["ci95"][o]
        return [[m["mean"][o] - lo], [hi - m["mean"][o]]]
    for ax, (i, j) in zip(axes, pairs, strict=False):
        if search_points is not None and len(search_points):
            sp = np.asarray(search_points, float)
            ax.scatter(sp[:, i], sp[:, j], s=10, color="0.75", label="EMORL search points (validation)")
            front = pareto_mask(sp[:, [i, j]])
            o = np.argsort(sp[front, i])
            ax.step(sp[front, i][o], sp[front, j][o], where="post", color="0.5", lw=1,
                    label="their Pareto front")
        for m in methods:
            color, marker = styles[m["method"]]
            ax.errorbar([m["mean"][objs[i]]], [m["mean"][objs[j]]], xerr=err(m, objs[i]), yerr=err(m, objs[j]),
                        fmt=marker, color=color, ms=11 if marker == "*" else 8, capsize=3,
                        mec="black", mew=0.6, label=m["label"])
        ax.set_xlabel(f"{objs[i]} score")
        ax.set_ylabel(f"{objs[j]} score")
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle("Per-objective trade-offs: methods on the test split (error bars: "
                 + ("95% CI, paired bootstrap over prompts)" if with_ci else "std over seeds)"), fontsize=11)
    return save_figure(fig, path)


def plot_search_modes(histories: dict[str, list[float]], evaluations: dict[str, int], path: str | Path) -> Path | None:
    """Best validation aggregate after each search round, one line per mixing mode."""
    histories = {m: h for m, h in histories.items() if h}
    if not histories:
        return None
    fig = Figure(figsize=(7, 4.6), layout="constrained")
    ax = fig.subplots()
    from emorl.methods import LABELS, MODE_METHOD

    styles = method_styles([MODE_METHOD.get(mode, mode) for mode in histories])
    for mode, h in histories.items():
        method = MODE_METHOD.get(mode, mode)
        color, marker = styles[method]
        ax.plot(range(1, len(h) + 1), h, "-" + marker, color=color, ms=8,
                label=f"{mode} ({LABELS.get(method, method)}), {evaluations.get(mode, 0)} points")
    ax.set_xlabel("search round")
    ax.set_ylabel("best validation aggregate so far")
    ax.set_xticks(range(1, max(len(h) for h in histories.values()) + 1))
    ax.set_title("Hierarchical weight search, by mixing mode")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")
    return save_figure(fig, path)
