"""The study table of docs/results.md, derived from a stored run's results.json (nothing typed by hand).

    python bench/study_table.py bench/results/default-run6

Prints one markdown row per method: each objective and the mean reward with its 95% CI (paired bootstrap over the
run's (prompt, seed) units), the paired difference to Uniform Weighted, and the prompts consumed in training; then
each adapter's gain on its own objective over the base model, and the front's hypervolumes where front/front.json
exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(x: dict | None, digits: int = 3) -> str:
    if not x:
        return "–"
    lo, hi = x.get("ci95", [None, None])
    m = f"{x['mean']:.{digits}f}"
    return m if lo is None else f"{m} [{lo:.{digits}f}, {hi:.{digits}f}]"


def diff(d: dict | None) -> str:
    if not d:
        return "–"
    lo, hi = d["ci95"]
    return f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + ("" if d["resolved"] else " unresolved")


def main(run: Path) -> None:
    r = json.loads((run / "results.json").read_text())
    objs = r["objectives"]
    print("| Method | " + " | ".join(objs) + " | Mean reward | − Uniform Weighted | Prompts consumed |")
    print("|---|" + "---:|" * (len(objs) + 3))
    for name, m in r["methods"].items():
        s = m["summary"]
        d = (m.get("differences") or {}).get("uniform", {}).get("mean_reward")
        prompts = (m.get("training") or {}).get("prompts")
        label = f"**{m['label']}**" if name == "emorl" else m["label"]
        print(f"| {label} | " + " | ".join(ci(s.get(f"score/{o}")) for o in objs)
              + f" | {ci(s.get('mean_reward'))} | {diff(d)} | {prompts if prompts is not None else '–'} |")
    print()
    for o in objs:
        m = r["methods"].get(f"single:{o}")
        if m:
            print(f"- {o} adapter alone on {o}, minus the base: "
                  f"{diff((m.get('differences') or {}).get('base', {}).get(f'score/{o}'))}")
    front = r.get("front")
    if front:
        print()
        for mode, v in front["modes"].items():
            lo, hi = v["hypervolume_ci95"]
            print(f"- {mode}: hypervolume {v['hypervolume']:.4f} [{lo:.4f}, {hi:.4f}] over {v['points']} points")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
