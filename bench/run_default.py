"""The default study end to end (`emorl run --preset default`), compared row by row with the paper's figure.

    python bench/run_default.py --run runs/default --execute   # run the study, then compare
    python bench/run_default.py --run runs/default             # compare a finished run

Prints the machine, the load average before and after, the wall time per stage, the comparison table, the
paper's numbers (Kong et al. 2025, results-scatter figure; spec §8.2) beside ours, and the paper's claims checked
on our run: EMORL within 0.03 of Uniform Weighted's mean reward, with fewer prompts consumed and higher
Diversity-2; and hidden > params > logits in the weight search.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# the paper's results scatter (PAIR, t5-base): training data points and mean reward, mean ± std over seeds
PAPER = {"base": (0, 0, 0.3413, 0.0124), "uniform": (23398, 7390, 0.835, 0.0199),
         "dynaopt": (31328, 16736, 0.8262, 0.0291), "soups": (18924, 4672, 0.6965, 0.0276),
         "emorl": (17529, 1650, 0.7684, 0.0206)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--execute", action="store_true", help="run `emorl run --preset default` first")
    ap.add_argument("extra", nargs="*", help="extra arguments for emorl run (e.g. key=value overrides)")
    args = ap.parse_args()
    run = Path(args.run)
    load0 = os.getloadavg()
    wall = None
    if args.execute:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "emorl.cli", "run", "--preset", "default", "--output", str(run),
                        "--no-progress", *args.extra], check=True)
        wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    res = json.loads((run / "results.json").read_text())
    stages = res.get("stages", {})
    import torch

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"load average before {load0[0]:.2f} / after {load1[0]:.2f} (1-min), {load1[1]:.2f} (5-min)")
    print("\n== wall time per stage ==")
    for name, st in stages.items():
        print(f"  {name:<10} {st.get('wall_time_s', 0):8.1f} s  ({st.get('status')})")
    total = sum(st.get("wall_time_s", 0) for st in stages.values())
    print(f"  {'stages':<10} {total:8.1f} s = {total / 60:.1f} min" + (f"; whole command {wall / 60:.1f} min"
                                                                         if wall else ""))
    print("\n== comparison (ours: test split) ==")
    t = res["tables"]["comparison"]
    print("| " + " | ".join(t["columns"]) + " |")
    for r in t["rows"]:
        print("| " + " | ".join(r) + " |")
    print("\n== against the paper (results scatter, PAIR/t5-base) ==")
    m = res["methods"]
    print(f"{'method':<18} {'paper prompts':>16} {'paper reward':>16} {'our prompts':>12} {'our reward':>16}")
    for key, (p, ps, r, rs) in PAPER.items():
        if key not in m:
            continue
        s = m[key]["summary"]["mean_reward"]
        print(f"{m[key]['label']:<18} {p:>8,} ± {ps:<6,} {r:.4f} ± {rs:.4f} {m[key]['training']['prompts']:>12,} "
              f"{s['mean']:.4f} ± {s['std']:.4f}")
    if "emorl" in m and "uniform" in m:
        e, u = m["emorl"], m["uniform"]
        de = e["summary"]["mean_reward"]["mean"] - u["summary"]["mean_reward"]["mean"]
        print("\n== the paper's claims, on our run ==")
        print(f"EMORL - Uniform mean reward: ours {de:+.4f} (within 0.03: {abs(de) <= 0.03 or de > 0}); "
              f"paper {PAPER['emorl'][2] - PAPER['uniform'][2]:+.4f}")
        ratio = e["training"]["prompts"] / max(1, u["training"]["prompts"])
        paper = PAPER["emorl"][0] / PAPER["uniform"][0]
        print(f"EMORL / Uniform prompts consumed: ours {ratio:.2f}; paper {paper:.2f}")
        for k in ("diversity2", "diversity2_ref"):
            print(f"{k}: EMORL {e['summary'][k]['mean']:.4f} vs Uniform {u['summary'][k]['mean']:.4f} "
                  f"(EMORL higher: {e['summary'][k]['mean'] > u['summary'][k]['mean']})")
    search = res.get("search", {})
    if search:
        order = sorted(search, key=lambda k: -search[k]["aggregate"])
        print("search (validation aggregate): " + " > ".join(f"{k} {search[k]['aggregate']:.4f}" for k in order))


if __name__ == "__main__":
    main()
