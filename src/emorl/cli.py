"""The emorl command line: emorl train | generate | search | evaluate | run | report | front | route | serve | config.

Each subcommand lives next to the stage it drives and exposes ``add_parser(subparsers)``; this file only
collects them, so importing the CLI stays cheap and stage modules stay independent. Nothing on this import path
imports torch (tests/test_cli.py checks it): `emorl --help` and `emorl config` answer at once.
"""

from __future__ import annotations

import os

# OpenMP threads that spin-wait for each other are 20-60x slower on a shared CPU; passive waiting costs nothing on
# an idle one. It must be in the environment before torch is first imported (the user's own value wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# transformers' "Loading weights" bars (one per model load) and hub download bars: noise in a run's output
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

from emorl.utils import EmorlError

# subcommand name -> module with add_parser(); each must import cheaply (no torch: `emorl --help` stays fast)
SUBCOMMANDS = {
    "train": "emorl.train.cli",
    "generate": "emorl.generate_cli",
    "search": "emorl.search.cli",
    "evaluate": "emorl.evaluate_cli",
    "run": "emorl.pipeline",
    "report": "emorl.report.cli",
    "front": "emorl.front.cli",
    "route": "emorl.router.cli",
    "config": "emorl.cli_config",
    "serve": "emorl.serve.cli",
    "judge": "emorl.judge.cli",
}


_MARKUP = [(re.compile(r"``(.+?)``", re.S), r"\1"), (re.compile(r":[a-z]+:`~?(.+?)`"), r"\1"),
           (re.compile(r"\*\*(.+?)\*\*"), r"\1")]


def plain(text: str | None) -> str | None:
    """Help text without the reStructuredText markup that docstrings use (``code``, :func:`x`, **bold**)."""
    if not text:
        return text
    for pat, rep in _MARKUP:
        text = pat.sub(rep, text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emorl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)  # an import error is a bug: let it show
    for p in [parser, *sub.choices.values()]:  # descriptions often come from docstrings
        p.description = plain(p.description)
        p.epilog = plain(p.epilog)
        for action in p._actions:
            action.help = plain(action.help)
    for action in sub._choices_actions:
        action.help = plain(action.help)
    return parser


def _warning_to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: object = None, line: str | None = None) -> None:
    """Python warnings (transformers' and peft's FutureWarnings...) go to the log file at debug level."""
    logging.getLogger("emorl.thirdparty").debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


_console_handler: logging.Handler | None = None


def setup_logging(verbose: bool) -> None:
    """Console: emorl's INFO and above (DEBUG with -v); a run's log file (utils.attach_log_file) gets DEBUG,
    including third-party warnings, which stay off the console unless -v."""
    import warnings

    global _console_handler
    root = logging.getLogger()
    if _console_handler is not None:
        root.removeHandler(_console_handler)
    _console_handler = logging.StreamHandler()
    _console_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    _console_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if not verbose:  # third-party notices: the log file only
        _console_handler.addFilter(lambda r: not r.name.startswith("emorl.thirdparty"))
    root.addHandler(_console_handler)
    root.setLevel(logging.INFO)
    logging.getLogger("emorl").setLevel(logging.DEBUG)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "debug" if verbose else "error")  # its own stderr handler
    if not sys.stderr.isatty():  # tqdm bars (search, generate) in a log file: one update per 30 s, not per step
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    warnings.showwarning = _warning_to_log


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    run = getattr(args, "run", None)  # commands on a run folder keep a debug log in it (emorl run: its own)
    if isinstance(run, str) and os.path.isdir(run) and args.command not in ("train", "run"):
        from emorl.utils import attach_log_file

        attach_log_file(os.path.join(run, "logs", f"{args.command}.log"))
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
