"""The depth trade-off study of issue 24: adapters on the top 1/4, 1/3, 1/2 and all decoder layers, each with a
training budget chosen on validation within the default's training time; EMORL's test reward against full depth.

Stages (each a plain emorl command, so every folder is an ordinary run folder that resumes on its own):

  1. budgets:  for every depth and every budget in the grid (learning rate x rank), ``emorl train`` the default
               preset's objectives into ``OUT/train/<depth>/<budget>``; the steps allowed are the default's
               ``train.max_steps`` scaled by full depth's time per step ÷ this depth's (measured on the first budget
               trained at that depth: a shallower adapter trains faster, so it gets more steps in the same time).
               The budget kept per depth is the one whose adapters' mean final validation reward (their
               ``emorl.json`` curves, one value per objective) is highest.
  2. runs:     ``emorl run --preset default`` into ``OUT/runs/<depth>`` with ``lora.layers`` and the chosen
               budget (the search and evaluation then decode with the shared trunk).
  3. compare:  per depth, from ``RUN/eval/replies/*.jsonl`` (units = (seed, prompt), paired across runs because
               every run evaluates the same test prompts and seeds): each single adapter's gain over the base on its
               own objective, EMORL's mean reward minus full depth's and minus Uniform Weighted's, all with
               paired-bootstrap 95 % CIs (``emorl.stats.paired_difference``); the EMORL decode's tokens/s from
               ``results.json``. Written to ``OUT/study.json`` and printed as a Markdown table.

    python bench/trunk_study.py --out runs/trunk-study                 # everything (hours on a 2-core CPU)
    python bench/trunk_study.py --out runs/trunk-study --stage compare # only re-read finished runs

What it needs: the default model and its reward models installed (the default preset's offline assets), about
(4 depths x budgets + 4) default-sized trainings of CPU time, and ``emorl`` on PATH (or ``--emorl``). Decode
throughput of the mix at B = 16 and at the evaluation's batch is measured separately by ``bench/trunk.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

DEPTHS = {"1/4": "top:1/4", "1/3": "top:1/3", "1/2": "top:1/2", "all": "all"}
LRS = [3e-4, 1e-3, 3e-3]
RANKS = [8, 16]


def emorl(exe: list[str], *args: str) -> None:
    print("$", " ".join([*exe, *args]), flush=True)
    subprocess.run([*exe, *args], check=True)


def adapter_infos(run: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run / "adapters").glob("*/emorl.json"))}


def final_validation(run: Path) -> float:
    """Mean over the run's adapters of each one's last validation reward (its own objective)."""
    vals = []
    for info in adapter_infos(run).values():
        curve = [c for c in info.get("curve", []) if "value" in c]  # {"step", "scores", "value": its objective's}
        if not curve:
            raise SystemExit(f"{run}: an adapter has no validation curve")
        vals.append(float(curve[-1]["value"]))
    return sum(vals) / len(vals)


def seconds_per_step(run: Path) -> float:
    infos = adapter_infos(run).values()
    return sum(i["wall_time_s"] for i in infos) / max(1, sum(i["steps"] for i in infos))


def budgets(exe: list[str], out: Path, default_steps: int) -> dict[str, dict[str, Any]]:
    chosen: dict[str, dict[str, Any]] = {}
    full_step: float | None = None
    for depth in sorted(DEPTHS, key=lambda d: DEPTHS[d] != "all"):  # full depth first: its step time sets the rest
        steps = default_steps
        scored = []
        for lr, r in itertools.product(LRS, RANKS):
            run = out / "train" / depth.replace("/", "of") / f"lr{lr:g}-r{r}"
            emorl(exe, "train", "--preset", "default", "--output", str(run), f"lora.layers={DEPTHS[depth]}",
                  f"train.lr={lr}", f"lora.r={r}", f"lora.alpha={4 * r}", f"train.max_steps={steps}")
            if full_step is None:
                full_step = seconds_per_step(run)
            if len(scored) == 0 and DEPTHS[depth] != "all":  # the same training time as full depth
                steps = max(default_steps, int(default_steps * full_step / seconds_per_step(run)))
            scored.append((final_validation(run), {"lr": lr, "r": r, "steps": steps, "folder": str(run)}))
        chosen[depth] = max(scored, key=lambda s: s[0])[1] | {"validation": max(s[0] for s in scored)}
    return chosen


def replies(run: Path, method: str) -> dict[tuple[int, str], dict[str, float]]:
    rows = [json.loads(line) for line in (run / "eval" / "replies" / f"{method}.jsonl").read_text().splitlines()]
    return {(r["seed"], r["prompt"]): r["scores"] for r in rows}


def compare(out: Path, chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from emorl.stats import paired_difference

    full = out / "runs" / "all"
    ref = replies(full, "emorl")
    units = sorted(ref)
    table: dict[str, Any] = {}
    for depth in DEPTHS:
        run = out / "runs" / depth.replace("/", "of")
        emorl_r = replies(run, "emorl")
        base_r, uniform_r = replies(run, "base"), replies(run, "uniform")
        mean = lambda rs: [sum(rs[u].values()) / len(rs[u]) for u in units]  # noqa: E731
        row: dict[str, Any] = {"budget": chosen.get(depth), "emorl - full": paired_difference(mean(emorl_r), mean(ref)),
                               "emorl - uniform": paired_difference(mean(emorl_r), mean(uniform_r))}
        for obj in ref[units[0]]:
            single = replies(run, f"single:{obj}") if (run / "eval" / "replies" / f"single:{obj}.jsonl").exists() \
                else None
            if single is not None:
                row[f"{obj}: single - base"] = paired_difference([single[u][obj] for u in units],
                                                                 [base_r[u][obj] for u in units])
        res = json.loads((run / "eval" / "results.json").read_text())
        row["emorl tokens/s"] = res["methods"]["emorl"]["summary"].get("tokens_per_s")
        table[depth] = row
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="study folder")
    ap.add_argument("--stage", choices=["all", "budgets", "runs", "compare"], default="all")
    ap.add_argument("--emorl", default="emorl", help="the emorl command (e.g. '.venv/bin/emorl')")
    ap.add_argument("--default-steps", type=int, default=8, help="the default preset's train.max_steps")
    args = ap.parse_args()
    out, exe = Path(args.out), args.emorl.split()
    out.mkdir(parents=True, exist_ok=True)
    chosen_file = out / "budgets.json"
    if args.stage in ("all", "budgets"):
        chosen_file.write_text(json.dumps(budgets(exe, out, args.default_steps), indent=1))
    chosen = json.loads(chosen_file.read_text()) if chosen_file.exists() else {}
    if args.stage in ("all", "runs"):
        for depth, b in chosen.items():
            emorl(exe, "run", "--preset", "default", "--output", str(out / "runs" / depth.replace("/", "of")),
                  f"lora.layers={DEPTHS[depth]}", f"train.lr={b['lr']}", f"lora.r={b['r']}", f"lora.alpha={4 * b['r']}",
                  f"train.max_steps={b['steps']}")
    if args.stage in ("all", "compare"):
        table = compare(out, chosen)
        (out / "study.json").write_text(json.dumps(table, indent=1))
        print("| depth | budget | EMORL − full [95% CI] | EMORL − Uniform [95% CI] | EMORL tok/s |")
        print("|---|---|---|---|---:|")
        for depth, row in table.items():
            d, u = row["emorl - full"], row["emorl - uniform"]
            b = row["budget"] or {}
            print(f"| {depth} | lr {b.get('lr')}, r {b.get('r')}, {b.get('steps')} steps | {d['mean']:+.3f} "
                  f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {u['mean']:+.3f} [{u['ci95'][0]:+.3f}, "
                  f"{u['ci95'][1]:+.3f}] | {row['emorl tokens/s'] or float('nan'):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
