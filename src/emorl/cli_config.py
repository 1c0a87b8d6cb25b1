"""``emorl config``: print the resolved config, or every key with its default and help."""

from __future__ import annotations

import argparse

from emorl.config import describe, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    from emorl.cli_common import add_config_args

    p = sub.add_parser("config", help="show the resolved config (or all keys with --keys)")
    add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emorl.cli_common import config_source

    if args.keys:
        for key, default, help_ in describe():
            print(f"{key} = {default}\n    {help_}")
        return 0
    print(load_config(config_source(args), args.overrides).to_yaml(), end="")
    return 0
