"""``emorl judge``: blind human A/B evaluation of a run's replies.

    emorl judge --run runs/default --pairs emorl:uniform,emorl:soups --n 40   # http://127.0.0.1:8001/
    emorl judge --run runs/default --pairs emorl:uniform --n 40 --html ab.html --rater ann   # one offline file
    emorl judge --run runs/default --import judge-answers-ann.jsonl          # that file's answers
    emorl judge --run runs/default --score                                  # win/tie/loss, sign test, Wilson CI

Each item shows two methods' replies to the same prompt (same seed) from the run's evaluation, sides and order
random (seeded by --seed, recorded in RUN/judge/plan.json); method names never reach the page. Answers go to
RUN/judge/answers.jsonl as they are given; run the same command again to continue where a rater stopped.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from emorl.utils import EmorlError

log = logging.getLogger("emorl.judge")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="blind human A/B evaluation of a run's replies (page, offline HTML, scoring)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="an evaluated run folder (RUN/eval/results.json and eval/replies/)")
    p.add_argument("--pairs", help="pairs of evaluated methods to compare, A:B,A:C (wins are counted for A)")
    p.add_argument("--n", type=int, help="prompts per pair (default: every prompt the evaluation decoded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts chosen, the sides and the order")
    p.add_argument("--rater", default="rater", help="the person answering (each person resumes their own answers)")
    p.add_argument("--criteria", help="comma-separated criteria (default: the run's objectives and 'overall')")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--html", metavar="FILE", help="write one self-contained offline page instead of serving")
    mode.add_argument("--import", dest="import_file", metavar="FILE",
                      help="add the answers downloaded from an offline page to RUN/judge/answers.jsonl")
    mode.add_argument("--score", action="store_true", help="score the answers (writes RUN/judge/summary.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8001)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emorl.judge import store

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise EmorlError(f"--run {run_dir}: no such folder; give an evaluated run folder (e.g. runs/default)")
    if args.score:
        return score(run_dir)
    if args.import_file:
        rater = None if args.rater == "rater" else args.rater  # default: the name the page was written for
        added, dup = store.import_answers(run_dir, args.import_file, rater=rater)
        print(f"added {added} answers from {args.import_file} to {run_dir / 'judge' / 'answers.jsonl'}"
              + (f" ({dup} were already there)" if dup else ""))
        return 0
    results = store.evaluated(run_dir)
    methods = list(results["methods"])
    if not args.pairs:
        raise EmorlError(f"--pairs: say which methods to compare, as A:B,A:C; the run's evaluated methods are "
                         f"{', '.join(methods)}")
    pairs = store.parse_pairs(args.pairs, methods)
    if args.n is not None and args.n < 1:
        raise EmorlError(f"--n {args.n}: give at least 1 prompt per pair")
    if not args.rater.strip():
        raise EmorlError("--rater: give a non-empty name")
    criteria = store.criteria_for(results, [c.strip() for c in args.criteria.split(",")] if args.criteria else None)
    items = store.build_items(run_dir, pairs, args.n, args.seed, results)
    n = len(items) // len(pairs)
    plan = store.record_plan(run_dir, items, store.session_settings(pairs, n, args.seed, args.rater, criteria)
                             | {"html": args.html})
    if args.html:
        from emorl.judge.page import write_html

        path = write_html(args.html, items, criteria, args.rater, plan["salt"])
        print(f"wrote {path}: {len(items)} blind items ({len(pairs)} pair(s) x {n} prompts), criteria "
              f"{', '.join(criteria)}, rater {args.rater!r}. Open it in any browser (no server, no network); the "
              f"rater downloads the answers at the end: `emorl judge --run {run_dir} --import FILE`")
        return 0
    return serve(args, run_dir, items, criteria)


def serve(args: argparse.Namespace, run_dir: Path, items: list, criteria: list[str]) -> int:
    try:
        import uvicorn

        from emorl.judge.app import Session, create_app
    except ModuleNotFoundError as e:
        raise EmorlError(f"emorl judge needs the serve extra ({e.name} is missing): pip install 'emorl[serve]'; "
                         f"or write an offline page with --html FILE") from e
    from emorl.judge.store import AnswerStore

    if not _loopback(args.host):
        log.warning("binding %s: anyone who can reach this port can answer as %r", args.host, args.rater)
    session = Session(items, criteria, args.rater, AnswerStore(run_dir))
    done = len(session.done())
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"emorl judge: {len(items)} blind items for rater {args.rater!r} ({done} answered, {len(items) - done} "
          f"left) at http://{host}:{args.port}/ ; answers go to {session.store.path}; Ctrl-C stops (run the same "
          f"command to continue)", flush=True)
    uvicorn.run(create_app(session), host=args.host, port=args.port, log_level="warning")
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def score(run_dir: Path) -> int:
    from emorl.evaluate import load_results
    from emorl.judge.stats import format_summary, summarise, write_summary
    from emorl.judge.store import AnswerStore, judge_dir, read_plan
    from emorl.methods import LABELS

    store = AnswerStore(run_dir)
    if not store.path.exists():
        raise EmorlError(f"{store.path} does not exist: no one has judged this run yet. Start with `emorl judge "
                         f"--run {run_dir} --pairs A:B`")
    results = load_results(run_dir) or {}
    labels = {m: v.get("label", LABELS.get(m, m)) for m, v in results.get("methods", {}).items()}
    plan = judge_dir(run_dir) / "plan.json"
    sessions = read_plan(run_dir).get("sessions", []) if plan.exists() else []
    order = [(p[0], p[1]) for s in reversed(sessions) for p in s.get("pairs", [])]  # the latest --pairs first
    summary = summarise(store.read(), {**LABELS, **labels}, order)
    path = write_summary(run_dir, summary)
    print(format_summary(summary))
    print(f"\nwrote {path} (`emorl report {run_dir}` includes it)")
    return 0
