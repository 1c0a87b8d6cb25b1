"""The depth trade-off study of issue 24: adapters on the top 1/4, 1/3, 1/2 and all decoder layers, each with a
training budget chosen on validation within the default's training time; EMORL's test reward against full depth.

Stages (each a plain emorl command, so every folder is an ordinary run folder that resumes on its own):

  1. budgets:  for every depth and every budget in the grid (learning rate x rank), ``emorl train`` the default
               preset's objectives into ``OUT/train/<depth>/<budget>``; the steps allowed are the default's
               ``train.max_steps`` scaled by full depth's time per step ÷ this depth's (measured on a probe, the
               first budget trained at the default's steps into ``OUT/train/<depth>/probe``: a shallower adapter
               trains faster, so it gets more steps in the same time; every budget of a depth trains that many).
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
    python bench/trunk_study.py --out /tmp/ts --quick                   # tiny preset, depths 1/2 and all, one
                                                                        # budget, 1 step: every stage in seconds
    # the reduced study of bench/RESULTS.md: full depth is an existing default run (not retrained), two learning
    # rates at rank 8, and each depth's run only what the comparison reads (EMORL's hidden mix, Uniform, singles)
    python bench/trunk_study.py --out runs/trunk-study --full-run runs/default --depths 1/4,1/3,1/2 \
        --lrs 1e-3,3e-3 --ranks 8 --probe-steps 2 --reduced-runs

With ``--full-run`` the "all" row is that run: its adapters' time per step sets the other depths' steps and its
test replies are the reference (the same preset evaluates the same test prompts and seeds). The run stage reuses
each depth's chosen budget folder (its adapters are current, so ``emorl run`` trains only the baselines).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEPTHS = {"1/4": "top:1/4", "1/3": "top:1/3", "1/2": "top:1/2", "all": "all"}
LRS = [3e-4, 1e-3, 3e-3]
RANKS = [8, 16]


@dataclass(frozen=True)
class Study:
    """What is trained: the preset, the depths, the budget grid (lr, rank) and extra arguments (flags, then
    overrides) for every emorl command."""

    preset: str = "default"
    depths: dict[str, str] = field(default_factory=lambda: dict(DEPTHS))
    grid: list[tuple[float, int]] = field(default_factory=lambda: list(itertools.product(LRS, RANKS)))
    extra: list[str] = field(default_factory=list)
    run_extra: list[str] = field(default_factory=list)  # overrides of the run stage only (what is evaluated)
    probe_steps: int | None = None  # the probe's steps (None: the default's)
    full_run: Path | None = None  # an existing full-depth run of the preset: the reference, not retrained


# --reduced-runs: each depth's run decodes and scores only what the comparison reads
REDUCED = ["search.modes=[hidden]", "eval.methods=[base,emorl,uniform,singles]", "eval.kl=false",
           "eval.extra_sets={}"]


# --quick: the tiny preset at its smallest that still runs every stage and every column of the comparison (two
# objectives: a search round of 3^2 points, not 3^3)
QUICK = Study("tiny", {"1/2": "top:1/2", "all": "all"}, [(LRS[1], 4)],
              ["--no-progress", "objectives={reflection: {type: reflection}, fluency: {type: fluency}}",
               "train.val_prompts=2", "search.prompts=2", "search.iterations=1", "search.reeval_top=2",
               "search.reeval_prompts=2", "search.reeval_seeds=[1000]", "search.modes=[hidden]", "eval.prompts=3",
               "eval.methods=[base,emorl,uniform,singles]"])


def emorl(exe: list[str] | None, *args: str) -> None:
    """One emorl command: as a process, or (``exe`` None, --quick) in this one, imports shared."""
    print("$", " ".join([*(exe or ["emorl"]), *args]), flush=True)
    if exe is not None:
        subprocess.run([*exe, *args], check=True)
        return
    from emorl.cli import main

    if main(list(args)) != 0:
        raise SystemExit(f"emorl {args[0]} failed")


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


def train(exe: list[str] | None, run: Path, study: Study, layers: str, lr: float, r: int, steps: int) -> None:
    emorl(exe, "train", "--preset", study.preset, "--output", str(run), *study.extra, f"lora.layers={layers}",
          f"train.lr={lr}", f"lora.r={r}", f"lora.alpha={4 * r}", f"train.max_steps={steps}")


def budgets(exe: list[str] | None, out: Path, default_steps: int, study: Study) -> dict[str, dict[str, Any]]:
    chosen: dict[str, dict[str, Any]] = {}
    full_step = 0.0
    depths = study.depths
    if study.full_run is not None:  # full depth is an existing run: its time per step, its own budget
        full_step = seconds_per_step(study.full_run)
        depths = {d: v for d, v in depths.items() if v != "all"}
    for depth in sorted(depths, key=lambda d: depths[d] != "all"):  # full depth first: its step time sets the rest
        folder = out / "train" / depth.replace("/", "of")
        steps = default_steps
        if depths[depth] != "all":  # the same training time as full depth, for every budget of this depth alike
            train(exe, folder / "probe", study, depths[depth], *study.grid[0], study.probe_steps or default_steps)
            steps = max(default_steps, int(default_steps * full_step / seconds_per_step(folder / "probe")))
        scored = []
        for lr, r in study.grid:
            run = folder / f"lr{lr:g}-r{r}"
            train(exe, run, study, depths[depth], lr, r, steps)
            if depths[depth] == "all" and not full_step:  # full depth's first budget sets the time per step
                full_step = seconds_per_step(run)
            scored.append((final_validation(run), {"lr": lr, "r": r, "steps": steps, "folder": str(run)}))
        chosen[depth] = max(scored, key=lambda s: s[0])[1] | {"validation": max(s[0] for s in scored)}
    return chosen


def replies(run: Path, method: str) -> dict[tuple[int, str], dict[str, float]]:
    rows = [json.loads(line) for line in (run / "eval" / "replies" / f"{method}.jsonl").read_text().splitlines()]
    return {(r["seed"], r["prompt"]): r["scores"] for r in rows}


def run_folder(out: Path, study: Study, depth: str, chosen: dict[str, dict[str, Any]]) -> Path:
    if study.depths[depth] == "all" and study.full_run is not None:
        return study.full_run
    if study.full_run is not None:  # the run continues the chosen budget's folder
        return Path(chosen[depth]["folder"])
    return out / "runs" / depth.replace("/", "of")


def search_grid(run: Path) -> tuple[dict[tuple[float, ...], Any], list[str]]:
    """The hidden search's first round (the grid, the same weight vectors at every depth): per point, its per-prompt
    scores (prompts, objectives)."""
    import numpy as np

    lines = [json.loads(x) for x in (run / "search" / "hidden" / "points.jsonl").read_text().splitlines()]
    names = lines[0]["names"]
    pts = {tuple(p["weights"]): np.array([p["per_prompt"][o] for o in names]).T for p in lines[1:]
           if p.get("round") == 0 and p.get("source") == "decoded"}
    return pts, names


def front_difference(run: Path, full: Path) -> dict[str, Any] | None:
    """Hypervolume of the search grid's points at this depth minus full depth's, paired over the search prompts,
    against the base's per-prompt scores (the zero point) at each depth's own."""
    import numpy as np

    from emorl.stats import hypervolume_difference

    a, _ = search_grid(run)
    b, _ = search_grid(full)
    common = sorted(set(a) & set(b) - {(0.0,) * len(next(iter(a)))})
    zero = (0.0,) * len(next(iter(a)))
    if not common or zero not in a or zero not in b:
        return None
    ref = (a[zero] + b[zero]) / 2  # the base model is the same at every depth; its two decodes averaged
    return hypervolume_difference(np.stack([a[w] for w in common]), np.stack([b[w] for w in common]), ref) | {
        "points": len(common), "prompts": int(ref.shape[0])}


def compare(out: Path, chosen: dict[str, dict[str, Any]], study: Study) -> dict[str, Any]:
    from emorl.stats import paired_difference

    depths = study.depths
    full = run_folder(out, study, next(d for d, v in depths.items() if v == "all"), chosen)
    ref = replies(full, "emorl")
    units = sorted(ref)
    table: dict[str, Any] = {}
    for depth in depths:
        run = run_folder(out, study, depth, chosen)
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
        row["emorl tokens/s"] = res["methods"]["emorl"]["summary"].get("tokens_per_s", {}).get("mean")
        row["search grid HV - full"] = None if run == full else front_difference(run, full)
        table[depth] = row
    return table


def hv_text(h: dict[str, Any] | None) -> str:
    return "—" if h is None else f"{h['mean']:+.4f} [{h['ci95'][0]:+.4f}, {h['ci95'][1]:+.4f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="study folder")
    ap.add_argument("--stage", choices=["all", "budgets", "runs", "compare"], default="all")
    ap.add_argument("--emorl", default="emorl", help="the emorl command (e.g. '.venv/bin/emorl')")
    ap.add_argument("--default-steps", type=int, default=8, help="the default preset's train.max_steps")
    ap.add_argument("--full-run", help="an existing full-depth run of the preset: the reference, not retrained")
    ap.add_argument("--depths", help="comma-separated depths of " + ",".join(DEPTHS) + " (default: all four)")
    ap.add_argument("--lrs", help=f"comma-separated learning rates of the budget grid (default: {LRS})")
    ap.add_argument("--ranks", help=f"comma-separated LoRA ranks of the budget grid (default: {RANKS})")
    ap.add_argument("--probe-steps", type=int, help="steps of each depth's timing probe (default: the default's)")
    ap.add_argument("--reduced-runs", action="store_true", help="each depth's run decodes only what the comparison "
                    "reads: " + " ".join(REDUCED))
    ap.add_argument("--quick", action="store_true", help="the tiny preset, depths 1/2 and all, one budget, 1 step, "
                    "few prompts, every command in this process (a smoke run of every stage)")
    args = ap.parse_args()
    study, exe = (QUICK, None) if args.quick else (Study(), args.emorl.split())
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else sorted({lr for lr, _ in study.grid})
    ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else sorted({r for _, r in study.grid})
    depths = dict(study.depths)
    if args.depths:
        bad = [d for d in args.depths.split(",") if d not in DEPTHS]
        if bad:
            raise SystemExit(f"--depths: unknown {bad}; choose from {list(DEPTHS)}")
        depths = {d: DEPTHS[d] for d in args.depths.split(",")}
    study = Study(study.preset, depths | ({"all": "all"} if args.full_run else {}),
                  list(itertools.product(lrs, ranks)), study.extra, REDUCED if args.reduced_runs else [],
                  args.probe_steps, Path(args.full_run) if args.full_run else None)
    if args.quick:
        args.default_steps = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen_file = out / "budgets.json"
    if args.stage in ("all", "budgets"):
        chosen_file.write_text(json.dumps(budgets(exe, out, args.default_steps, study), indent=1))
    chosen = json.loads(chosen_file.read_text()) if chosen_file.exists() else {}
    if args.stage in ("all", "runs"):
        for depth, b in chosen.items():
            emorl(exe, "run", "--preset", study.preset, "--output", str(run_folder(out, study, depth, chosen)),
                  *study.extra, f"lora.layers={study.depths[depth]}", f"train.lr={b['lr']}", f"lora.r={b['r']}",
                  f"lora.alpha={4 * b['r']}", f"train.max_steps={b['steps']}", *study.run_extra)
    if args.stage in ("all", "compare"):
        table = compare(out, chosen, study)
        (out / "study.json").write_text(json.dumps(table, indent=1))
        print("| depth | budget | EMORL − full [95% CI] | EMORL − Uniform [95% CI] | search grid HV − full "
              "| EMORL tok/s |")
        print("|---|---|---|---|---|---:|")
        for depth, row in table.items():
            d, u = row["emorl - full"], row["emorl - uniform"]
            b = row["budget"] or {}
            print(f"| {depth} | lr {b.get('lr')}, r {b.get('r')}, {b.get('steps')} steps | {d['mean']:+.3f} "
                  f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {u['mean']:+.3f} [{u['ci95'][0]:+.3f}, "
                  f"{u['ci95'][1]:+.3f}] | {hv_text(row['search grid HV - full'])} | "
                  f"{row['emorl tokens/s'] or float('nan'):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
