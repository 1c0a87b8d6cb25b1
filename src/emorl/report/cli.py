"""``emorl report RUN``: re-render a run's report (report.md, results.json, figures/) from its folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="re-render RUN/report.md, RUN/results.json and RUN/figures/",
                       description="Re-render a run's report from what its folder holds (evaluation results, "
                                   "adapters' training curves, search logs). Nothing is decoded.")
    p.add_argument("run", help="run folder (made by `emorl run`, or by train + search + evaluate)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emorl.report import write_report
    from emorl.utils import EmorlError

    folder = Path(args.run)
    if not folder.is_dir():
        raise EmorlError(f"{folder} is not a folder; give the run folder (e.g. runs/default)")
    path = write_report(folder)
    print(f"wrote {path}, {folder / 'results.json'} and {folder / 'figures'}/")
    return 0
