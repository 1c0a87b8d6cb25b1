"""``emorl evaluate --run RUN``: decode every method on the test split with the same settings and score it."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from emorl.cli_common import add_run_args
    from emorl.methods import METHODS

    p = sub.add_parser("evaluate", help="evaluate the base, EMORL and the baselines on the test split",
                       description="Decode every method on the same prompts with the same decoding settings and "
                                   "seeds (eval.generation, eval.seeds), score each reply with every objective, and "
                                   "write RUN/eval/results.json and RUN/eval/replies/. Methods whose inputs did not "
                                   "change since the last evaluation are reused.")
    add_run_args(p, "config.yaml, adapters/, baselines/, search/", "eval.generation.max_new_tokens=48")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"methods to evaluate (default: eval.methods); any of {', '.join(METHODS)}, 'singles' (each "
                        f"objective's adapter alone) or 'single:<objective>'")
    p.add_argument("--split", choices=["train", "validation", "test"], help="default: eval.split (test)")
    p.add_argument("--seeds", type=int, help="decode with seeds 0..N-1 (sampling only; default: eval.seeds)")
    p.add_argument("--prompts", type=int, help="evaluate on at most this many prompts (default: eval.prompts)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy (eval.generation.do_sample=true)")
    p.add_argument("--force", action="store_true", help="re-decode methods even if their results are current")
    p.add_argument("--no-report", action="store_true", help="don't re-render RUN/report.md afterwards")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: every available core)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emorl.cli_common import eval_overrides
    from emorl.config import load_run_config
    from emorl.evaluate import evaluate_run
    from emorl.pipeline import set_threads
    from emorl.utils import console

    set_threads(args.threads)
    run_dir = Path(args.run)
    cfg = load_run_config(run_dir, [*args.overrides, *eval_overrides(args)])
    results = evaluate_run(run_dir, cfg, args.methods, split=args.split, progress=not args.no_progress,
                           force=args.force, keep_others=bool(args.methods))
    objs = results["objectives"]
    con = console()
    con.print(f"[bold]{results['split']}[/] split, {results['prompts']} prompts, seeds {results['seeds']}")
    for m in results["methods"].values():
        s = m["summary"]
        per = "  ".join(f"{o} {s[f'score/{o}']['mean']:.3f}" for o in objs)
        con.print(f"  {m['label']:<20} mean {s['mean_reward']['mean']:.3f} ± {s['mean_reward']['std']:.3f}  {per}  "
                  f"div-2 {s['diversity2']['mean']:.3f}")
    if not args.no_report:
        from emorl.report import write_report

        con.print(f"report: {write_report(run_dir)}")
    return 0
