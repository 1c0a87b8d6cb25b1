"""Argparse pieces shared by the stage commands (``emorl train | run | config | search | evaluate ...``).

Each stage's CLI lives beside its stage; what several of them parse alike lives here, below every stage, so a stage
CLI never imports the top-level ``emorl.cli``. Cheap to import: no torch, no emorl module but ``utils``.
"""

from __future__ import annotations

import argparse
from typing import Any

from emorl.utils import EmorlError


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config/--preset and trailing key=value overrides, shared by every stage command."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="YAML config file")
    g.add_argument("--preset", help="built-in preset: default, tiny, paper-t5-pair")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.lr=3e-4 train.max_steps=50")


def add_run_args(p: argparse.ArgumentParser, holds: str, example: str, progress: bool = True) -> None:
    """--run (required), --no-progress and trailing key=value overrides on top of RUN/config.yaml: what every command
    that works on an existing run folder parses alike. ``holds``: what the run folder must hold, for the help."""
    p.add_argument("--run", required=True, help=f"run folder ({holds})")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides on top of RUN/config.yaml, e.g. {example}")


def config_source(args: argparse.Namespace) -> str | None:
    """The config file or preset the command was given (None: the default preset)."""
    return args.config or args.preset


def eval_overrides(args: Any) -> list[str]:
    """``--seeds/--prompts/--sample`` of ``emorl evaluate`` and ``emorl run`` as config overrides."""
    out = []
    if getattr(args, "seeds", None) is not None:
        if args.seeds < 1:
            raise EmorlError(f"--seeds must be >= 1, got {args.seeds}")
        out.append(f"eval.seeds=[{', '.join(map(str, range(args.seeds)))}]")
    if getattr(args, "prompts", None) is not None:
        out.append(f"eval.prompts={args.prompts}")
    if getattr(args, "sample", False):
        out.append("eval.generation.do_sample=true")
    return out
