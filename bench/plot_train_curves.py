"""Plot the validation curves of a run's adapters: each objective's own score against prompts consumed.

    python bench/plot_train_curves.py RUN OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(run: str, out: str) -> None:
    adapters = sorted(Path(run, "adapters").glob("*/emorl.json"))
    fig, axes = plt.subplots(1, len(adapters), figsize=(4 * len(adapters), 3.2), squeeze=False)
    for ax, meta_path in zip(axes[0], adapters, strict=True):
        meta = json.loads(meta_path.read_text())
        name = meta["objective"]
        x = [c["prompts"] for c in meta["curve"]]
        for obj in meta["curve"][0]["scores"]:
            y = [c["scores"][obj] for c in meta["curve"]]
            ax.plot(x, y, marker="o", lw=2.5 if obj == name else 1, alpha=1 if obj == name else 0.5, label=obj)
        ax.set_title(f"adapter trained on {name}")
        ax.set_xlabel("training prompts consumed")
        ax.set_ylabel("validation mean score")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("EMORL training on SmolLM2-135M (CPU): each adapter's validation scores (bold: its objective)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
