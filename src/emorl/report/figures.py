"""Figures of a run's report (PNG, matplotlib's Agg canvas; no display needed).

* ``training_curves.png`` — validation reward against prompts consumed for every trained policy (the paper's
  training-curve figure): each EMORL adapter on its own objective, the one-policy baselines on the mean.
* ``results_scatter.png`` — prompts consumed in training against test mean reward, error bars = std over
  decoding seeds (the paper's results scatter).
* ``tradeoffs.png`` — every pair of objectives: the methods' test scores (with error bars) placed over the
  points the hidden-mixing search scored on validation prompts, with that search's Pareto front.
* ``search_modes.png`` — best validation aggregate after each round of the search, one line per mode.
* ``search_<mode>_<view>.png`` — the search's own views (history, landscape, trade-off, weights).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure

from emorl.utils import atomic_write_bytes

# one colour and marker per method, stable across figures
STYLE = {"base": ("#7f7f7f", "X"), "uniform": ("#1f77b4", "s"), "dynaopt": ("#2ca02c", "D"),
         "gdpo": ("#bcbd22", "H"),
         "fixed": ("#17becf", "P"), "soups": ("#9467bd", "^"), "logits": ("#8c564b", "v"),
         "probs": ("#e377c2", "<"), "emorl": ("#d62728", "*")}


SINGLE_MARKERS = "ohpd8"


def _style(method: str, index: int = 0, count: int = 1) -> tuple[str, str]:
    """(colour, marker) of a method; ``single:<objective>`` rows get shades of EMORL's red, one per adapter."""
    if method.startswith("single:"):
        return colors.to_hex(colormaps["Reds"](0.45 + 0.5 * index / max(1, count - 1))), SINGLE_MARKERS[index % 5]
    return STYLE.get(method, ("#bcbd22", "o"))


def _styles(methods: Sequence[str]) -> dict[str, tuple[str, str]]:
    singles = [m for m in methods if m.startswith("single:")]
    return {m: _style(m, singles.index(m) if m in singles else 0, len(singles)) for m in methods}


def save(fig: Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_training_curves(curves: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """``curves``: label -> {"method", "prompts": [...], "value": [...], "what": str, "converged": bool}.

    One line per trained policy; the last point is marked (a filled marker if the run converged, hollow if it
    stopped on its budget), as the paper marks where each run stops."""
    curves = {k: c for k, c in curves.items() if c.get("prompts")}
    if not curves:
        return None
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    ax = fig.subplots()
    emorl_cmap = colormaps["Reds"]
    emorl = [k for k, c in curves.items() if c["method"] == "emorl"]
    for label, c in curves.items():
        if c["method"] == "emorl":
            color = emorl_cmap(0.45 + 0.5 * emorl.index(label) / max(1, len(emorl) - 1))
            ls = "-"
        else:
            color, ls = _style(c["method"])[0], "--"
        x, y = np.asarray(c["prompts"], float), np.asarray(c["value"], float)
        ax.plot(x, y, ls, color=color, lw=1.6, marker=".", ms=5, label=f"{label} ({c['what']})")
        ax.plot(x[-1], y[-1], "o", ms=9, color=color, mfc=color if c.get("converged") else "white", mew=1.6)
    ax.set_xlabel("training prompts consumed")
    ax.set_ylabel("validation reward (mean score)")
    ax.set_title("Validation reward during training\n(end of each run: ● converged, ○ budget spent)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_results_scatter(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``rows``: {"method", "label", "prompts", "mean", "std", "ci95"}: one point per method with its error bar (the
    95% CI where every row has one, else the std over seeds)."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    styles = _styles([r["method"] for r in rows])
    with_ci = all(r.get("ci95") for r in rows)  # the paired-bootstrap 95% CI where the evaluation has it
    for r in rows:
        color, marker = styles[r["method"]]
        yerr = [[r["mean"] - r["ci95"][0]], [r["ci95"][1] - r["mean"]]] if with_ci else [r["std"]]
        ax.errorbar([r["prompts"]], [r["mean"]], yerr=yerr, fmt=marker, color=color, ms=11 if marker == "*"
                    else 8, capsize=4, label=r["label"], mec="black", mew=0.6)
    _label_columns(ax, [(r["prompts"], r["mean"], r["label"]) for r in rows])
    ax.set_xlabel("training prompts consumed (EMORL, soups, logits: the K adapters together)")
    ax.set_ylabel("test mean reward (mean of the objectives)")
    n = max((r.get("n", 1) for r in rows), default=1)
    ax.set_title("Data consumed vs mean reward (error bars: 95% CI, paired bootstrap over units)" if with_ci else
                 f"Data consumed vs mean reward (error bars: std over {n} decoding seed{'s' * (n != 1)})")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    ax.legend(fontsize=8, loc="best")
    return save(fig, path)


def _label_columns(ax: Any, points: Sequence[tuple[float, float, str]]) -> None:
    """Label points to their right; points that share an x get their labels stacked top-down so none overlap
    (a thin line joins a label pushed away from its point)."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    xr = (max(xs) - min(xs)) or 1.0
    yr = (max(ys) - min(ys)) or 1.0
    gap = 0.05 * yr
    groups: list[list[tuple[float, float, str]]] = []
    for p in sorted(points, key=lambda p: p[0]):
        if groups and abs(p[0] - groups[-1][0][0]) <= 0.03 * xr:
            groups[-1].append(p)
        else:
            groups.append([p])
    for g in groups:
        last = None
        for x, y, label in sorted(g, key=lambda p: -p[1]):
            ty = y if last is None else min(y, last - gap)
            last = ty
            ax.annotate(label, (x, y), xytext=(x + 0.04 * xr, ty), fontsize=8, va="center",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if abs(ty - y) > 1e-12 else None)
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, min(ys) - gap * max(len(g) for g in groups)), max(hi, max(ys) + gap))


def plot_tradeoffs(objectives: Sequence[str], methods: Sequence[dict[str, Any]], path: str | Path,
                   search_points: np.ndarray | None = None) -> Path | None:
    """``methods``: {"method", "label", "mean": {obj: m}, "std": {obj: s}}. ``search_points``: (n, d) per-
    objective validation scores of the hidden-mixing search, drawn grey behind with their Pareto front (pass them
    only when the evaluation decoded like the search, or the two sets of scores are not comparable)."""
    from emorl.search.plots import pareto_mask

    objs = list(objectives)
    if len(objs) < 2:
        return None
    pairs = list(itertools.combinations(range(len(objs)), 2))
    ncol = min(3, len(pairs))
    nrow = math.ceil(len(pairs) / ncol)
    fig = Figure(figsize=(5.2 * ncol, 4.8 * nrow + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for ax, (i, j) in zip(axes, pairs, strict=False):
        if search_points is not None and len(search_points):
            sp = np.asarray(search_points, float)
            ax.scatter(sp[:, i], sp[:, j], s=10, color="0.75", label="EMORL search points (validation)")
            front = pareto_mask(sp[:, [i, j]])
            o = np.argsort(sp[front, i])
            ax.step(sp[front, i][o], sp[front, j][o], where="post", color="0.5", lw=1,
                    label="their Pareto front")
        styles = _styles([m["method"] for m in methods])
        for m in methods:
            color, marker = styles[m["method"]]
            ax.errorbar([m["mean"][objs[i]]], [m["mean"][objs[j]]], xerr=[m["std"][objs[i]]],
                        yerr=[m["std"][objs[j]]], fmt=marker, color=color, ms=11 if marker == "*" else 8, capsize=3,
                        mec="black", mew=0.6, label=m["label"])
        ax.set_xlabel(f"{objs[i]} score")
        ax.set_ylabel(f"{objs[j]} score")
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle("Per-objective trade-offs: methods on the test split (error bars: std over seeds)", fontsize=11)
    return save(fig, path)


def plot_search_modes(histories: dict[str, list[float]], evaluations: dict[str, int], path: str | Path) -> Path | None:
    """Best validation aggregate after each search round, one line per mixing mode."""
    histories = {m: h for m, h in histories.items() if h}
    if not histories:
        return None
    fig = Figure(figsize=(7, 4.6), layout="constrained")
    ax = fig.subplots()
    from emorl.methods import LABELS, MODE_METHOD

    for mode, h in histories.items():
        method = MODE_METHOD.get(mode, mode)
        color, marker = _style(method)
        ax.plot(range(1, len(h) + 1), h, "-" + marker, color=color, ms=8,
                label=f"{mode} ({LABELS.get(method, method)}), {evaluations.get(mode, 0)} points")
    ax.set_xlabel("search round")
    ax.set_ylabel("best validation aggregate so far")
    ax.set_xticks(range(1, max(len(h) for h in histories.values()) + 1))
    ax.set_title("Hierarchical weight search, by mixing mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)
