"""The front figure: one panel per pair of objectives, each mode's lattice points (faint), the 2-D non-dominated
set of their projection (a step line: that pair's front), the one-policy methods as markers, and the reference
point (the base model)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from emorl.search.plots import method_styles, save_figure
from emorl.stats import pareto_front

# the modes' fronts are lines: one colour each (the methods keep their family colours and own markers)
MODE_COLOURS = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def plot_fronts(analysis: dict[str, Any], modes: dict[str, dict[str, Any]], path: str | Path) -> Path:
    objectives = analysis["objectives"]
    pairs = list(itertools.combinations(range(len(objectives)), 2)) or [(0, 0)]
    fig = Figure(figsize=(max(9.0, 5.2 * len(pairs)), 5.4), layout="constrained")
    axes = [fig.add_subplot(1, len(pairs), i + 1) for i in range(len(pairs))]
    styles = method_styles(["base", *analysis["one_policy"]])
    ref = [analysis["reference"]["scores"][o] for o in objectives]
    for ax, (a, b) in zip(axes, pairs, strict=True):
        for c, (entry, data) in enumerate(modes.items()):
            pts = np.array([[r["scores"][objectives[a]], r["scores"][objectives[b]]] for r in data["points"]])
            colour = MODE_COLOURS[c % len(MODE_COLOURS)]
            ax.scatter(pts[:, 0], pts[:, 1], s=10, color=colour, alpha=0.25, linewidths=0)
            f = pts[pareto_front(pts)]
            f = f[np.argsort(f[:, 0])]
            hv = analysis["modes"][entry]["hypervolume"]
            ax.step(f[:, 0], f[:, 1], where="pre", color=colour, lw=1.6, marker="o", ms=3,
                    label=f"{entry} front (HV {hv:.3g})")
            searched = [r for r in data["points"] if r.get("searched")]
            for r in searched:
                ax.scatter([r["scores"][objectives[a]]], [r["scores"][objectives[b]]], s=90, marker="*",
                           color=colour, edgecolors="black", linewidths=0.6, zorder=5)
        for name, p in analysis["one_policy"].items():
            colour, marker = styles[name]
            ax.scatter([p["scores"][objectives[a]]], [p["scores"][objectives[b]]], s=70, marker=marker, color=colour,
                       edgecolors="black", linewidths=0.6, zorder=6, label=p["label"])
        colour, marker = styles["base"]
        ax.scatter([ref[a]], [ref[b]], s=70, marker=marker, color=colour, zorder=6, label="Base model (reference)")
        ax.set_xlabel(objectives[a])
        ax.set_ylabel(objectives[b])
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"Pareto fronts per mixing mode ({analysis.get('split', 'test')} split; stars: searched points; "
                 "HV against the base model)", fontsize=10)
    return save_figure(fig, path)
