"""``emorl route``: fit a run's router of per-prompt mixing weights, and compare it on the test split.

    emorl route --run runs/default                     # RUN/router/: data.*, router.json, router.safetensors
    emorl route --run runs/default --compare           # + router vs global vs uniform vs oracle (compare.json)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from emorl.cli_common import add_run_args

    p = sub.add_parser("route", help="fit the per-prompt weight router (--weights auto) and compare it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "trained adapters and, ideally, a hidden search", "route.k=3", progress=False)
    p.add_argument("--method", choices=["auto", "knn", "ridge"], help="default: route.method")
    p.add_argument("--step", type=float, help="lattice step per axis, a fraction of search.w_max (default: route.step)")
    p.add_argument("--prompts", type=int, help="training prompts (default: route.prompts)")
    p.add_argument("--fresh", action="store_true", help="decode the router's data again even if it is current")
    p.add_argument("--compare", action="store_true", help="then compare on the test split (paired bootstrap)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emorl.config import load_run_config
    from emorl.router.run import fit_run

    overrides = list(args.overrides)
    for flag, key in [("method", "route.method"), ("step", "route.step"), ("prompts", "route.prompts")]:
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = load_run_config(args.run, overrides)
    from emorl.models import load_base
    from emorl.rewards import build_rewards

    base = load_base(cfg.model)
    rewards = build_rewards(cfg.objectives, base)
    router, meta = fit_run(Path(args.run), cfg, base=base, rewards=rewards, fresh=args.fresh)
    fit = meta["fit"]
    gw = [round(float(x), 3) for x in router.global_weights]
    print(f"router: {router.method} on {fit['training_prompts']} prompts, {fit['data']['points']} lattice points; "
          f"fallback beyond cosine distance {router.threshold:.3f} -> global {gw}")
    print("cross-validated mean reward: " + ", ".join(f"{k} {v:.4f}" for k, v in fit["cv"].items()))
    if args.compare:
        from emorl.router.compare import compare_run

        rep = compare_run(Path(args.run), cfg, base=base, rewards=rewards)
        r = rep["results"]["mean_reward"]
        for k in ("router", "global", "uniform", "oracle", "router-global", "gap_closed"):
            print(f"  {k:<14} {r[k]['mean']:+.4f}  [{r[k]['lo']:+.4f}, {r[k]['hi']:+.4f}]")
        print(json.dumps({"written": str(Path(args.run) / "router" / "compare.json")}))
    return 0
