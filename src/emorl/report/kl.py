"""The report's KL view: each method's reward (training rewards' mean and, where the run has them, the held-out
judges) against its per-token KL to the base (``figures/reward_vs_kl.png``), the axis on which Gao et al. (2023)
show a proxy reward rising while a held-out one turns down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from emorl.search.plots import method_styles, save_figure


def _point(stat: dict[str, Any]) -> tuple[float, list[list[float]] | None]:
    ci = stat.get("ci95")
    return stat["mean"], ([[stat["mean"] - ci[0]], [ci[1] - stat["mean"]]] if ci else None)


def plot_reward_vs_kl(results: dict[str, Any], path: str | Path) -> Path | None:
    """One point per method: x = KL to the base per token, y = mean training reward (filled) and, with judges, the
    judges' mean (hollow, same colour), error bars = 95% CIs."""
    rows = [(n, m) for n, m in results["methods"].items() if "kl_per_token" in m["summary"]]
    if len(rows) < 2:
        return None
    judges = list(results.get("judges") or [])
    jkey = ("judge_mean" if len(judges) > 1 else f"judge/{judges[0]}") if judges else None
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    styles = method_styles([n for n, _ in rows])
    for name, m in rows:
        color, marker = styles[name]
        x, xerr = _point(m["summary"]["kl_per_token"])
        y, yerr = _point(m["summary"]["mean_reward"])
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt=marker, color=color, ms=11 if marker == "*" else 8, capsize=3,
                    mec="black", mew=0.6, label=m["label"])
        if jkey and jkey in m["summary"]:
            jy, jerr = _point(m["summary"][jkey])
            ax.errorbar([x], [jy], yerr=jerr, fmt=marker, color=color, mfc="white", ms=11 if marker == "*" else 8,
                        capsize=3, mew=1.2)
    ax.set_xlabel("KL to the base model per token (sampled distribution vs base, nats)")
    ax.set_ylabel("mean score")
    ax.set_title("Reward against KL to the base (filled: training rewards" + (", hollow: held-out judges)" if jkey
                                                                              else ")"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside the data
    return save_figure(fig, path)


def kl_markdown(s: dict[str, Any]) -> list[str]:
    """The report's paragraph under the figure (empty when the run has no KL)."""
    if "figures/reward_vs_kl.png" not in set(s.get("figures", [])):
        return []
    return ["## Reward against KL to the base", "", "![reward against KL to the base](figures/reward_vs_kl.png)", "",
            "x: each method's KL to the base model per generated token, on its test replies: the distribution it "
            "sampled (after temperature, top-k, top-p; for a mix, the mixed scores) against the base's untruncated "
            "distribution at the same temperature on the same prefix (`emorl.kl`). The base's own value is the KL that "
            "top-k/top-p truncation alone costs. A method far to the right that gains on the training rewards but "
            "not on the held-out judges is the over-optimisation pattern of Gao et al. (2023).", ""]
