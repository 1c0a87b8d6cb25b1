"""``emorl front --run RUN``: decode each mixing mode's weight lattice on the evaluation's prompts, write RUN/front/."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from emorl.cli_common import add_run_args

    p = sub.add_parser("front", help="Pareto front and hypervolume of every mixing mode -> RUN/front/",
                       description="Decode an evenly spaced lattice of weight points (front.step over [0, "
                                   "front.w_max]^K, plus each mode's searched point) for every mode of front.modes on "
                                   "the evaluation's prompts and seeds; write each mode's front, its hypervolume "
                                   "(reference point: the base model's scores) with a bootstrap CI, and which "
                                   "one-policy methods each front dominates. Needs `emorl evaluate` (with base) "
                                   "first.")
    add_run_args(p, "trained, searched and evaluated", "front.step=0.5 front.modes=[hidden]")
    p.add_argument("--force", action="store_true", help="decode every lattice again, even if unchanged")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emorl.config import load_run_config
    from emorl.front import front_run

    run_dir = Path(args.run)
    cfg = load_run_config(run_dir, args.overrides)
    out = front_run(run_dir, cfg, progress=not args.no_progress, force=args.force)
    print(f"reference point (the base model's mean scores): {out['reference']['scores']}")
    for line in out["statements"]:
        print(line)
    print(f"wrote {run_dir / 'front'}/front.json and {run_dir / out['figure']}")
    return 0
