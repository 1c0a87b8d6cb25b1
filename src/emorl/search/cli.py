"""``emorl search``: find the mixing weights of a trained run's adapters (hierarchical grid by default)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from emorl.cli_common import add_run_args

    p = sub.add_parser("search", help="search the adapters' mixing weights on validation prompts",
                       description="Decode a fixed validation subset for each weight point, score it with every "
                                   "objective's reward, and search the weights (RUN/search/<mode>/: points.jsonl, "
                                   "best.json, figures).")
    add_run_args(p, "holds config.yaml and adapters/<objective>/", "search.generation.max_new_tokens=16")
    p.add_argument("--mode", default="hidden",
                   help="how the adapters are mixed: hidden (EMORL, default), logits, probs, params; add -convex for "
                        "the sum-1 form (hidden-convex is the paper's mix, params-convex the parameter average); "
                        "plain names follow search.anchor (default base: h0 + sum w_k (h_k - h0))")
    p.add_argument("--method", choices=["hierarchical", "grid", "random"], help="default: search.method")
    p.add_argument("--iterations", type=int, help="hierarchical rounds (default: search.iterations)")
    p.add_argument("--prompts", type=int, help="validation prompts per weight point (default: search.prompts)")
    p.add_argument("--objective-weights", type=float, nargs="+", metavar="W",
                   help="aggregate = weighted mean of the objectives, one weight each (default: plain mean)")
    p.add_argument("--batch-points", type=int, help="weight points decoded together (default: search.batch_points)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the search logged in points.jsonl")
    g.add_argument("--fresh", action="store_true", help="discard an existing points.jsonl and start over")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emorl.config import load_run_config
    from emorl.search.runner import search_run

    overrides = list(args.overrides)
    for flag, key in [("iterations", "search.iterations"), ("prompts", "search.prompts"),
                      ("batch_points", "search.batch_points"), ("method", "search.method")]:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.objective_weights is not None:
        overrides.append(f"search.objective_weights=[{', '.join(map(str, args.objective_weights))}]")
    cfg = load_run_config(args.run, overrides)
    result, out = search_run(Path(args.run), cfg, mode=args.mode, resume=args.resume, fresh=args.fresh,
                             progress=not args.no_progress, plots=not args.no_plots)
    import json

    best = json.loads((out / "best.json").read_text())  # the chosen point (after any re-evaluation)
    print(f"best weights ({args.mode} mixing, {result.method} search):")
    for n, w in best["weights"].items():
        print(f"  {n:<16} {w:.5f}")
    print(f"aggregate score  {best['aggregate']:.4f} (search)"
          + (f", {best['reeval_aggregate']:.4f} re-evaluated" if best.get("reeval_aggregate") is not None else ""))
    for n, s in best["scores"].items():
        print(f"  {n:<16} {s:.4f}")
    print(f"points: {result.n_unique} ({result.n_decoded} decoded now, {result.n_reused} same direction, "
          f"{result.n_cached} from the log)")
    print(f"written to {out}/ (points.jsonl, best.json{', figures' if not args.no_plots else ''})")
    return 0
