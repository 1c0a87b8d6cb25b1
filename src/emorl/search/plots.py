"""Figures of a weight search (PNG, matplotlib's Agg canvas; no display needed).

* ``history.png`` — score of every point in the order scored, round by round, with the best so far; and
  the zoom: the box of each round and the best point's path (the weight plane for d = 2, per-axis
  intervals otherwise).
* ``landscape.png`` — the scores over the weights: a curve (d = 1), a heatmap (d = 2), a 3-D scatter and
  its three pairwise projections (d = 3), parallel coordinates (d > 3).
* ``tradeoff.png`` — every point's per-objective scores, pair by pair, with the Pareto front.
* ``weights.png`` — each objective's weight in the best point (the paper's interpretability figure).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import cm, colormaps, colors
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from emorl.search.evaluator import PointRecord
from emorl.search.hierarchical import SearchResult
from emorl.stats import pareto_front
from emorl.utils import atomic_write_bytes

CMAP = "viridis"


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """True for the rows not dominated by another row (higher is better in every column): the figures' mask over
    :func:`emorl.stats.pareto_front`, which keeps one of equal rows; its copies are on the front too."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    kept = values[pareto_front(values)]
    return (values[:, None, :] == kept[None, :, :]).all(axis=-1).any(axis=-1)


def _finite(points: Sequence[PointRecord]) -> tuple[np.ndarray, np.ndarray]:
    w = np.array([p.weights for p in points], dtype=float)
    s = np.array([p.aggregate for p in points], dtype=float)
    keep = np.isfinite(s)
    return w[keep], s[keep]


def _norm(scores: np.ndarray) -> colors.Normalize:
    lo, hi = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    return colors.Normalize(lo, hi if hi > lo else lo + 1e-9)


def _title(fig: Figure, text: str, result: SearchResult) -> None:
    fig.suptitle(f"{text}\n{result.method} search, {result.n_unique} points, best aggregate "
                 f"{result.aggregate:.4f}", fontsize=11)


def _colorbar(fig: Figure, ax: object, norm: colors.Normalize, label: str = "aggregate score",
              shrink: float = 1.0) -> None:
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=CMAP), ax=ax, label=label, shrink=shrink)


# ------------------------------------------------------------------------------------------- history

def plot_history(result: SearchResult, names: Sequence[str], path: str | Path) -> Path:
    pts = result.points
    d = len(names)
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.1, 1])
    agg = np.array([p.aggregate for p in pts])
    rounds = np.array([p.round for p in pts])
    idx = np.arange(1, len(pts) + 1)
    ok = np.isfinite(agg)
    n_rounds = max(1, int(rounds.max()) + 1) if len(pts) else 1
    rcolors = colormaps["tab10"] if n_rounds <= 10 else colormaps["turbo"]
    for r in range(n_rounds):
        sel = ok & (rounds == r)
        ax1.scatter(idx[sel], agg[sel], s=14, color=rcolors(r % 10 if n_rounds <= 10 else r / (n_rounds - 1)),
                    label=f"round {r + 1}" if result.rounds else None)
    best_so_far = np.maximum.accumulate(np.where(ok, agg, -np.inf))
    ax1.step(idx[ok], best_so_far[ok], where="post", color="black", lw=1.2, label="best so far")
    ax1.set_xlabel("point (in the order the search asked for it)")
    ax1.set_ylabel("aggregate score")
    ax1.set_title("Score of every point")
    ax1.legend(fontsize=8, loc="lower right")
    if d == 2:
        _zoom_plane(fig, ax2, result, names)
    else:
        _zoom_axes(ax2, result, names, rcolors, n_rounds)
    _title(fig, "Search history", result)
    return save_figure(fig, path)


def _weight_plane(ax: object, result: SearchResult, names: Sequence[str]) -> None:
    """The unit square of two weights, with the best point starred: the frame both plane views share."""
    ax.plot(*result.weights, marker="*", color="crimson", ms=16, mec="black", ls="none", label="best point")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_aspect("equal")
    ax.set_xlabel(f"weight of {names[0]}")
    ax.set_ylabel(f"weight of {names[1]}")


def _zoom_plane(fig: Figure, ax: object, result: SearchResult, names: Sequence[str]) -> None:
    w, s = _finite(result.points)
    norm = _norm(s)
    ax.scatter(w[:, 0], w[:, 1], c=s, cmap=CMAP, norm=norm, s=22, edgecolors="none")
    for r in result.rounds:
        ax.add_patch(Rectangle(r.lo, r.side, r.side, fill=False, lw=1.0, ls="--", color="0.35"))
    if result.rounds:
        path = np.array([r.best_weights for r in result.rounds])
        ax.plot(path[:, 0], path[:, 1], "-o", color="crimson", ms=4, lw=1.2, label="best after each round")
    _weight_plane(ax, result, names)
    ax.set_title("Zoom: each round's box (dashed) and the best point's path")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    _colorbar(fig, ax, norm)


def _zoom_axes(ax: object, result: SearchResult, names: Sequence[str], rcolors: object, n_rounds: int) -> None:
    d = len(names)
    x = np.arange(d)
    if result.rounds:
        width = 0.6
        for r in result.rounds:
            off = -width / 2 + width * (r.index + 0.5) / n_rounds
            c = rcolors(r.index % 10 if n_rounds <= 10 else r.index / max(1, n_rounds - 1))
            ax.vlines(x + off, r.lo, r.hi, color=c, lw=4, alpha=0.8, label=f"round {r.index + 1} box")
            ax.plot(x + off, r.best_weights, "o", color="black", ms=3)
    ax.plot(x, result.weights, "*", color="crimson", ms=14, mec="black", label="best point")
    ax.set_xticks(x, [f"w[{n}]" for n in names], rotation=30 if d > 4 else 0)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("weight")
    ax.set_title("Zoom: each round's interval per axis (dots: best so far)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1))


# ----------------------------------------------------------------------------------------- landscape

def plot_landscape(result: SearchResult, names: Sequence[str], path: str | Path) -> Path:
    d = len(names)
    w, s = _finite(result.points)
    norm = _norm(s)
    if d == 1:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        o = np.argsort(w[:, 0])
        ax.plot(w[o, 0], s[o], "-o", ms=4)
        ax.axvline(result.weights[0], color="crimson", ls="--", label="best")
        ax.set_xlabel(f"weight of {names[0]}")
        ax.set_ylabel("aggregate score")
        ax.legend()
        _title(fig, "Score along the weight axis", result)
    elif d == 2:
        fig = Figure(figsize=(7.5, 6.5), layout="constrained")
        ax = fig.subplots()
        _heatmap(fig, ax, result, names, w, s, norm)
        _title(fig, "Score heatmap over the weight plane", result)
    elif d == 3:
        fig = Figure(figsize=(11, 10), layout="constrained")
        ax3 = fig.add_subplot(2, 2, 1, projection="3d")
        ax3.scatter(w[:, 0], w[:, 1], w[:, 2], c=s, cmap=CMAP, norm=norm, s=14, depthshade=False)
        ax3.scatter(*[[v] for v in result.weights], marker="*", s=220, color="crimson", edgecolors="black")
        ax3.set_xlabel(names[0])
        ax3.set_ylabel(names[1])
        ax3.set_zlabel(names[2])
        ax3.set_box_aspect(None, zoom=0.8)
        ax3.set_title("weights in 3-D (colour: score)")
        for k, (i, j) in enumerate(itertools.combinations(range(3), 2)):
            ax = fig.add_subplot(2, 2, k + 2)
            o = np.argsort(s)  # best points drawn last, on top
            ax.scatter(w[o, i], w[o, j], c=s[o], cmap=CMAP, norm=norm, s=16, edgecolors="none")
            ax.plot(result.weights[i], result.weights[j], "*", color="crimson", ms=15, mec="black")
            ax.set_xlabel(f"weight of {names[i]}")
            ax.set_ylabel(f"weight of {names[j]}")
            ax.set_xlim(-0.03, 1.03)
            ax.set_ylim(-0.03, 1.03)
            ax.set_aspect("equal")
            ax.set_title(f"projection on ({names[i]}, {names[j]})")
        _colorbar(fig, fig.axes, norm, shrink=0.6)
        _title(fig, "Scores over the weight cube (star: best point)", result)
    else:
        fig = Figure(figsize=(max(8, 1.6 * d), 5.5), layout="constrained")
        ax = fig.subplots()
        o = np.argsort(s)
        x = np.arange(d)
        for i in o:
            ax.plot(x, w[i], color=colormaps[CMAP](norm(s[i])), lw=0.8, alpha=0.6)
        ax.plot(x, result.weights, color="crimson", lw=3, marker="o", label="best point")
        ax.set_xticks(x, [f"w[{n}]" for n in names])
        ax.set_ylabel("weight")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(loc="upper right")
        _colorbar(fig, ax, norm)
        _title(fig, "Parallel coordinates: one line per point, coloured by score", result)
    return save_figure(fig, path)


def _heatmap(fig: Figure, ax: object, result: SearchResult, names: Sequence[str], w: np.ndarray, s: np.ndarray,
             norm: colors.Normalize) -> None:
    """Each point fills the cell of its round's grid (finer rounds drawn over coarser ones), so the plane is
    tiled at the resolution the search actually used; random points are shown as an interpolated surface."""
    finite = [p for p in result.points if math.isfinite(p.aggregate)]
    if result.method == "random":
        if len(w) >= 3:
            ax.tripcolor(w[:, 0], w[:, 1], s, cmap=CMAP, norm=norm, shading="gouraud")
        ax.scatter(w[:, 0], w[:, 1], c="white", s=6)
    else:
        if result.method == "hierarchical":
            cell = [2.0 ** -(p.round + 1) for p in finite]
        else:
            ax_vals = np.unique(w[:, 0])
            cell = [float(np.diff(ax_vals).min()) if len(ax_vals) > 1 else 1.0] * len(finite)
        order = np.argsort([-c for c in cell], kind="stable")  # coarse first, fine on top
        rects = [Rectangle((finite[i].weights[0] - cell[i] / 2, finite[i].weights[1] - cell[i] / 2), cell[i], cell[i])
                 for i in order]
        pc = PatchCollection(rects, cmap=CMAP, norm=norm, edgecolors="none")
        pc.set_array(np.array([finite[i].aggregate for i in order]))
        ax.add_collection(pc)
    _weight_plane(ax, result, names)
    ax.legend(loc="upper right", fontsize=8)
    _colorbar(fig, ax, norm)


# ------------------------------------------------------------------------------------------ tradeoff

def plot_tradeoff(result: SearchResult, path: str | Path) -> Path | None:
    """Per-objective scores of every evaluated point, pair by pair, with the Pareto front (None without
    per-objective scores, e.g. an analytic objective)."""
    pts = [p for p in result.points if p.scores and p.source != "degenerate"]
    if not pts:
        return None
    objs = list(pts[0].scores)
    if len(objs) < 2:
        return None
    vals = np.array([[p.scores[o] for o in objs] for p in pts])
    agg = np.array([p.aggregate for p in pts])
    front = pareto_mask(vals)
    pairs = list(itertools.combinations(range(len(objs)), 2))
    ncol = min(3, len(pairs))
    nrow = math.ceil(len(pairs) / ncol)
    fig = Figure(figsize=(5.2 * ncol + 1, 4.8 * nrow + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    norm = _norm(agg)
    best = np.array([result.scores.get(o, np.nan) for o in objs])
    for ax, (i, j) in zip(axes, pairs, strict=False):
        ax.scatter(vals[:, i], vals[:, j], c=agg, cmap=CMAP, norm=norm, s=16, edgecolors="none",
                   label="evaluated point")
        ax.scatter(vals[front, i], vals[front, j], facecolors="none", edgecolors="crimson", s=50, lw=1.2,
                   label=f"Pareto front, all {len(objs)} objectives")
        pf2 = pareto_mask(vals[:, [i, j]])
        o = np.argsort(vals[pf2, i])
        ax.step(vals[pf2, i][o], vals[pf2, j][o], where="post", color="crimson", lw=1, alpha=0.7,
                label=f"front of ({objs[i]}, {objs[j]})")
        ax.plot(best[i], best[j], "*", color="gold", ms=17, mec="black", label="best aggregate")
        ax.set_xlabel(f"{objs[i]} score (validation mean)")
        ax.set_ylabel(f"{objs[j]} score (validation mean)")
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    _colorbar(fig, axes[len(pairs) - 1], norm)
    _title(fig, f"Trade-off between objectives ({int(front.sum())} of {len(pts)} points on the Pareto front)",
           result)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------- weights

def plot_weights(result: SearchResult, names: Sequence[str], path: str | Path, mode: str = "") -> Path:
    """Bars: each objective's weight in the best point, and its share of the total (what the search says
    each objective contributes)."""
    w = np.array(result.weights)
    share = w / w.sum() if w.sum() > 0 else np.zeros_like(w)
    fig = Figure(figsize=(max(6, 1.4 * len(names) + 2), 4.6), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(list(names), w, color=colormaps["tab10"](np.arange(len(names)) % 10))
    for b, wi, sh in zip(bars, w, share, strict=True):
        ax.annotate(f"{wi:.3f}\n({sh:.0%})", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("weight in the best point (share of the sum)")
    ax.set_xlabel("objective (its adapter)")
    sc = ", ".join(f"{k} {v:.3f}" for k, v in result.scores.items())
    fig.suptitle(f"Weights found{' (' + mode + ' mixing)' if mode else ''}: aggregate {result.aggregate:.4f}"
                 + (f"\n{sc}" if sc else ""), fontsize=11)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ complexity

def plot_complexity(rows: Sequence[dict], path: str | Path) -> Path:
    """Evaluations needed by the hierarchical search vs a full grid of the same resolution, per d (log
    scale): the paper's complexity figure, from counts measured by the benchmark."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    dims = sorted({r["dim"] for r in rows})
    for k, d in enumerate(dims):
        rs = sorted((r for r in rows if r["dim"] == d), key=lambda r: r["iterations"])
        per_axis = [2 ** r["iterations"] + 1 for r in rs]
        c = colormaps["tab10"](k)
        ax.plot(per_axis, [r["hierarchical"] for r in rs], "-o", color=c, label=f"d={d} hierarchical")
        ax.plot(per_axis, [r["grid"] for r in rs], "--s", color=c, alpha=0.7, label=f"d={d} full grid")
    ax.set_xscale("log", base=2)
    ticks = sorted({2 ** r["iterations"] + 1 for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("resolution: points per axis (2^n + 1 after n rounds)")
    ax.set_ylabel("weight points evaluated")
    ax.set_title("Hierarchical search O(3^d log N) vs full grid O(N^d)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_all(result: SearchResult, names: Sequence[str], folder: str | Path, mode: str = "") -> list[Path]:
    """Every figure of one search into ``folder``; returns the files written."""
    folder = Path(folder)
    out = [plot_history(result, names, folder / "history.png"),
           plot_landscape(result, names, folder / "landscape.png"),
           plot_tradeoff(result, folder / "tradeoff.png"),
           plot_weights(result, names, folder / "weights.png", mode)]
    return [p for p in out if p is not None]


# ------------------------------------------------------------------- shared by every figure of the package

def save_figure(fig: Figure, path: str | Path) -> Path:
    """The one figure saver: PNG at 110 dpi, written atomically (a killed run leaves no half-written figure)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# A method's colour is its family's, its marker its own, so methods stay apart in every figure and legend. Families:
# the base, adapters mixed at decoding, one adapter alone, one policy trained on every reward, adapters merged in
# parameters (soups), and anything else.
FAMILY_COLOURS = {"base": "#7f7f7f", "mix": "#d62728", "single": "#ff7f0e", "one-policy": "#1f77b4",
                  "soups": "#9467bd", "other": "#17becf"}
METHOD_STYLE = {"base": ("base", "X"), "emorl": ("mix", "*"), "emorl-convex": ("mix", "P"),
                "emorl-routed": ("mix", "p"), "logits": ("mix", "v"), "probs": ("mix", "<"),
                "uniform": ("one-policy", "s"), "dynaopt": ("one-policy", "D"), "gdpo": ("one-policy", "h"),
                "fixed": ("one-policy", "d"), "soups": ("soups", "^"), "soups-avg": ("soups", ">")}
SPARE_MARKERS = "ov<dpH8>^sD1234"  # for single adapters and unknown methods, skipping markers already taken


def method_styles(methods: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) of every method in one figure: its family's colour, a marker no other method there has
    (``single:<objective>`` adapters and unknown methods take the next marker no method of the figure uses)."""
    taken = {METHOD_STYLE[m][1] for m in methods if m in METHOD_STYLE}
    spare = iter([m for m in SPARE_MARKERS if m not in taken])
    out: dict[str, tuple[str, str]] = {}
    for m in methods:
        if m in METHOD_STYLE:
            family, marker = METHOD_STYLE[m]
        else:
            family, marker = "single" if m.startswith("single:") else "other", next(spare, "o")
        out[m] = (FAMILY_COLOURS[family], marker)
    return out
