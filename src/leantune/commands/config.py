"""``leantune config``: print the default (or a resolved) config with every field documented."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the config with every field documented",
        description="Print the default config as YAML, each field preceded by its documentation. "
        "Give a YAML file and/or key=value overrides to see the resolved config instead.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--no-comments", action="store_true", help="values only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leantune.commands.train import split_items
    from leantune.config import ConfigError, load_config, render_config

    path, overrides = split_items(args.items)
    try:
        cfg = load_config(path, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"leantune config: {err}", file=sys.stderr)
        return 2
    print(render_config(cfg, comments=not args.no_comments))
    return 0
