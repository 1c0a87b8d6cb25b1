"""The ``emorl`` command line: ``emorl train | generate | search | evaluate | run | report | config | serve``.

Each subcommand lives next to the stage it drives and exposes ``add_parser(subparsers)``; this file only
collects them, so importing the CLI stays cheap and stage modules stay independent.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from emorl.utils import EmorlError

# subcommand name -> module with add_parser(); missing modules are skipped (stages land one by one)
SUBCOMMANDS = {
    "train": "emorl.train.cli",
    "generate": "emorl.ensemble.cli",
    "search": "emorl.search.cli",
    "evaluate": "emorl.evaluate_cli",
    "run": "emorl.pipeline",
    "report": "emorl.report.cli",
    "config": "emorl.cli_config",
    "serve": "emorl.serve.cli",
}


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config/--preset and trailing key=value overrides, shared by every stage command."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="YAML config file")
    g.add_argument("--preset", help="built-in preset: default, tiny, paper-t5-pair")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.lr=3e-4 train.max_steps=50")


def config_source(args: argparse.Namespace) -> str | None:
    return args.config or args.preset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emorl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EmorlError as e:
        if args.verbose or os.environ.get("EMORL_DEBUG"):
            raise
        print(f"emorl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emorl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
