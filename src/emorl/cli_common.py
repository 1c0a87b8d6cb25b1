"""Argparse pieces shared by the stage commands (``emorl train | run | config | generate ...``).

Each stage's CLI lives beside its stage; what several of them parse alike lives here, below every stage, so a stage
CLI never imports the top-level ``emorl.cli``. Cheap to import: no torch, no emorl module above ``utils``.
"""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config/--preset and trailing key=value overrides, shared by every stage command."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="YAML config file")
    g.add_argument("--preset", help="built-in preset: default, tiny, paper-t5-pair")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.lr=3e-4 train.max_steps=50")


def config_source(args: argparse.Namespace) -> str | None:
    """The config file or preset the command was given (None: the default preset)."""
    return args.config or args.preset
