"""What the benchmark scripts share: the run folder they measure, either ``--run RUN`` or, with ``--quick`` alone, a
tiny random-model study made in a temp folder (so that the test suite can smoke-run every script at every commit)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# the smallest budget that still leaves adapters, a uniform baseline and a hidden search's best.json (~30 s)
TINY_OVERRIDES = ["train.max_steps=1", "search.iterations=1", "search.prompts=2", "search.reeval_top=2",
                  "search.reeval_prompts=3", "search.modes=[hidden]", "eval.prompts=3",
                  "eval.methods=[base,emorl,uniform]", "route.prompts=6", "route.step=0.5", "route.folds=2",
                  "route.k=2"]


def bench_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The script's parser with what every run-measuring script takes: ``--run``, ``--quick`` (the smallest
    settings; a tiny run of its own if no --run) and ``--output`` (its results as JSON)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a finished study (adapters, baselines/uniform, search/hidden/best.json)")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {quick_help}; without --run, on a tiny "
                                                         "random-model study made in a temp folder")
    ap.add_argument("--output", help="write the results as JSON here")
    return ap


def tiny_run(folder: Path) -> Path:
    """``emorl run --preset tiny`` with the smallest budget into ``folder/tiny``."""
    run = folder / "tiny"
    proc = subprocess.run([sys.executable, "-m", "emorl.cli", "run", "--preset", "tiny", "--output", str(run),
                           "--no-progress", *TINY_OVERRIDES], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"making the tiny run for --quick failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return run


@contextmanager
def run_folder(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Iterator[Path]:
    """``--run``, else (``--quick``) a tiny run in a temp folder removed afterwards; neither is a usage error."""
    if args.run:
        yield Path(args.run)
        return
    if not args.quick:
        ap.error("give --run RUN or --quick")
    with tempfile.TemporaryDirectory(prefix="emorl-bench-quick-") as tmp:
        yield tiny_run(Path(tmp))
