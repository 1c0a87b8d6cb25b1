"""EMORL at matched cost: each objective adapter trained on 1/K of a one-policy budget, against Uniform Weighted.

    python bench/matched_cost.py --run runs/default [--modes hidden] [--set model.dtype=bfloat16]
    python bench/matched_cost.py --quick [--run TINY_RUN] --out out.json  # a tiny random run (made in a temp
                                                                          # folder unless given): the plumbing only

The equal-steps study trains each of the K adapters as long as one baseline policy, so EMORL consumes K times the
prompts. The paper's claim is the other way round: comparable reward from fewer prompts. This trains a second set
of adapters with ``train.max_steps = max_steps // K`` (so the K adapters together see the prompts of one Uniform
policy), searches their weights on validation and evaluates them on the run's test units (its prompts, seeds and
decoding settings), in ``RUN-matched/`` with ``emorl run``. Then, paired over the same units:

- matched EMORL − Uniform Weighted (the run's), and matched EMORL − equal-steps EMORL, on mean reward and per
  objective, with 95% CIs;
- the prompts each consumed.

Writes bench/results/matched_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"
# --quick: a tiny random study at its smallest with what this compares against (EMORL and Uniform Weighted)
QUICK = ["train.max_steps=1", "train.val_prompts=2", "search.iterations=1", "search.prompts=2", "search.reeval_top=2",
         "search.reeval_prompts=2", "search.reeval_seeds=[1000]", "search.modes=[hidden]", "eval.prompts=3",
         "eval.methods=[emorl,uniform]"]


def tiny_run(folder: Path) -> Path:
    """A tiny random-model study for --quick (its matched run goes beside it)."""
    run = folder / "tiny"
    subprocess.run([sys.executable, "-m", "emorl.cli", "run", "--preset", "tiny", "--output", str(run), "--no-progress",
                    *QUICK], check=True, capture_output=True, timeout=900)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a finished study (required unless --quick)")
    ap.add_argument("--quick", action="store_true", help="a tiny random run in a temp folder (unless --run); the JSON "
                    "goes to --out only")
    ap.add_argument("--modes", default="hidden", help="search keys for the matched adapters, comma-separated")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra override for the matched run, e.g. model.dtype=bfloat16 to pin the dtype of a run "
                         "made where `auto` meant another one (repeatable)")
    args = ap.parse_args()
    if not (args.run or args.quick):
        ap.error("give --run RUN or --quick")
    with tempfile.TemporaryDirectory(prefix="matched-cost-") as tmp:
        out = matched_cost(Path(args.run) if args.run else tiny_run(Path(tmp)), args.modes.split(","), args.set,
                           in_process=args.quick)
    if args.out or not args.quick:
        path = Path(args.out) if args.out else OUT / "matched_cost.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def matched_cost(run: Path, modes: list[str], extra: list[str], in_process: bool = False) -> dict:
    """Train and evaluate the matched-cost adapters beside ``run`` (``emorl run`` as a process, or in this one) and
    compare them with it, paired."""
    from emorl.config import load_config
    from emorl.evaluate_stats import unit_scores
    from emorl.stats import paired_difference

    cfg = load_config(str(run / "config.yaml"))
    n_adapters = len(cfg.trained_objectives())
    steps = max(1, cfg.train.max_steps // n_adapters)
    matched = run.parent / f"{run.name}-matched"
    overrides = [f"train.max_steps={steps}", "eval.methods=[emorl,singles]", f"search.modes=[{','.join(modes)}]",
                 "front.enabled=false", "route.enabled=false", *extra]
    cmd = [str(Path(sys.executable).parent / "emorl"), "run", "--config", str(run / "config.yaml"),
           "--output", str(matched), "--no-progress", *overrides]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    if in_process:  # --quick: imports shared
        from emorl.cli import main

        if main(cmd[1:]) != 0:
            raise SystemExit("the matched run failed")
    else:
        subprocess.run(cmd, check=True, env=os.environ.copy())
    seconds = time.perf_counter() - t0

    full = json.loads((run / "eval" / "results.json").read_text())
    mine = json.loads((matched / "eval" / "results.json").read_text())
    if mine["prompts"] != full["prompts"] or mine["seeds"] != full["seeds"] or \
            mine.get("prompts_sha256") != full.get("prompts_sha256"):
        raise SystemExit("the matched run's evaluation is not on the run's units; they cannot be paired")
    envs = {"run": _environment(run), "matched_run": _environment(matched)}
    dtypes = {k: (e or {}).get("dtype") for k, e in envs.items()}
    if None not in dtypes.values() and len(set(dtypes.values())) > 1:
        raise SystemExit(f"the runs loaded their base in different dtypes ({dtypes}): pin the run's with "
                         f"--set model.dtype={dtypes['run']}")
    if dtypes["run"] is None:
        print(f"note: {run}/stages.json records no environment, so its dtype cannot be checked; the matched run "
              f"used {dtypes['matched_run']} (pin it with --set model.dtype=...)", file=sys.stderr)
    objectives = list(full["objectives"])

    def units(r: Path, res: dict, name: str) -> dict:
        name = res["methods"][name].get("same_as") or name
        u = unit_scores(r / "eval" / "replies" / f"{name}.jsonl", objectives)
        if u is None:
            raise SystemExit(f"{r}/eval/replies/{name}.jsonl is missing")
        return u

    m = units(matched, mine, "emorl")
    refs = {"uniform": units(run, full, "uniform"), "emorl (equal steps)": units(run, full, "emorl")}
    metrics = ["mean_reward", *(f"score/{o}" for o in objectives)]
    out = {"run": str(run), "matched_run": str(matched), "n_adapters": n_adapters, "steps_per_adapter": steps,
           "full_steps": cfg.train.max_steps, "wall_time_s": round(seconds, 1), "overrides": extra,
           "environment": envs,
           "prompts_consumed": {"matched emorl (all adapters)": sum(
               p.get("prompts_consumed", 0) for p in _policies(matched).values()),
               "uniform": _policies(run).get("uniform", {}).get("prompts_consumed"),
               "emorl (equal steps, all adapters)": sum(v.get("prompts_consumed", 0)
                                                        for n, v in _policies(run).items()
                                                        if n in cfg.trained_objectives())},
           "matched_weights": mine["methods"]["emorl"].get("weights"),
           "scores": {"matched emorl": {x: float(m[x].mean()) for x in metrics},
                      **{n: {x: float(u[x].mean()) for x in metrics} for n, u in refs.items()}},
           "differences": {f"matched emorl - {n}": {x: paired_difference(m[x], u[x]) for x in metrics}
                           for n, u in refs.items()}}
    return out


def _environment(run: Path) -> dict | None:
    """The machine and dtype a run was made with (``stages.json``'s ``environment``), or None if not recorded."""
    from emorl.pipeline.plan import Stages

    return Stages(run).data.get("environment")


def _policies(run: Path) -> dict:
    """Per policy: what its emorl.json records (steps, prompts consumed, ...)."""
    from emorl.models import read_adapter_info

    return {d.name: vars(read_adapter_info(d)) for d in [*(run / "adapters").glob("*"), *(run / "baselines").glob("*")]
            if (d / "emorl.json").exists()}


if __name__ == "__main__":
    main()
