"""Local vs Ray executor (issue 6): K=3 adapters trained, then one round of the hidden-mode weight search, on the
tiny and the default preset, side by side in one process. Wall time per phase; Ray's overhead = its start-up
plus whatever the spread does not win back.

    python bench/executors.py                          # tiny, then default (default: 4 steps, 1 search round)
    python bench/executors.py --presets tiny --repeats 3
    python bench/executors.py --quick --json out.json  # tiny preset at its smallest, the local executor only

On a machine with C cores, Ray runs min(C, K) training tasks at once (1 CPU each); the local executor trains
the K adapters together in one batched process. Both give the same adapters and scores (tests/test_ray.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

OVERRIDES = {"tiny": [], "default": ["train.max_steps=4", "train.val_every=4"]}
# --quick: the plumbing only (Ray's path is tests/test_ray.py's: its start-up alone costs more than this whole run)
QUICK = ["train.max_steps=1", "train.val_prompts=2", "search.prompts=2", "search.reeval_top=2",
         "search.reeval_prompts=2", "search.reeval_seeds=[1000]"]


def one(preset: str, kind: str, root: Path, extra: list[str] | None = None) -> dict[str, float]:
    from emorl.config import load_config
    from emorl.executors import TrainJob, make_executor
    from emorl.executors.local import Resources
    from emorl.pipeline import normalised
    from emorl.search.runner import search_run

    run = root / f"{preset}-{kind}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = normalised(load_config(preset, [*OVERRIDES[preset], *(extra or []), "search.iterations=1",
                                          f"executor.kind={kind}"]), run)
    run.mkdir(parents=True)
    cfg.save(run / "config.yaml")
    res = Resources(cfg)
    t0 = time.perf_counter()
    ex = make_executor(cfg, run, res)
    t1 = time.perf_counter()
    ex.train([TrainJob("single", tuple(cfg.objectives))], resume=False, progress=False)
    t2 = time.perf_counter()
    result, _ = search_run(run, cfg, mode="hidden", fresh=True, progress=False, plots=False,
                           names=list(cfg.objectives), objective=ex.search_objective)
    t3 = time.perf_counter()
    ex.close()
    t4 = time.perf_counter()
    return {"start_s": t1 - t0, "train_s": t2 - t1, "search_s": t3 - t2, "close_s": t4 - t3, "total_s": t4 - t0,
            "best": result.aggregate, "points": result.n_decoded}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "default"])
    ap.add_argument("--kinds", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 1 step, 2 prompts, local executor only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.presets, args.kinds, args.repeats = ["tiny"], ["local"], 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(tempfile.mkdtemp(prefix="emorl-bench-exec-"))
    print(f"# {platform.machine()}, {os.cpu_count()} cpus; load {os.getloadavg()}")
    out: dict[str, Any] = {"load_start": os.getloadavg(), "runs": {}}
    try:
        for preset in args.presets:
            rows: dict[str, list[dict[str, float]]] = {k: [] for k in args.kinds}
            for _ in range(args.repeats):
                for kind in args.kinds:  # interleaved: a drifting load hits both
                    r = one(preset, kind, root, QUICK if args.quick else None)
                    rows[kind].append(r)
                    print(f"{preset:>8} {kind:>5}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
            med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
            out["runs"][preset] = {"rows": rows, "median": med}
            both = set(med) == {"local", "ray"}
            print(f"\n{preset}: median wall time (s)\n| phase | " + " | ".join(med) + (" | ray / local |" if both
                                                                                       else " |"))
            print("|---|" + "---:|" * (len(med) + both))
            for m in ("start_s", "train_s", "search_s", "close_s", "total_s"):
                cells = [f"{med[k][m]:.1f}" for k in med]
                if both:
                    a, b = med["local"][m], med["ray"][m]
                    cells.append(f"{b / a:.2f}" if a > 0.05 else "–")
                print(f"| {m[:-2]} | " + " | ".join(cells) + " |")
            if not both:
                continue
            diff = abs(med["local"]["best"] - med["ray"]["best"])
            print(f"best aggregate: local {med['local']['best']:.6f}, ray {med['ray']['best']:.6f} (difference "
                  f"{diff:.1e}: reward models batch other rows beside each reply)\n", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["load_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
