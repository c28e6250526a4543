"""``leantune plot RUN_DIR``."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="PNG of a run's loss / eval / lr / tokens-per-second curves",
        description="Draw RUN_DIR/metrics.jsonl into a PNG (default RUN_DIR/plot.png).",
    )
    p.add_argument("run_dir")
    p.add_argument("-o", "--out", help="output PNG path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leantune.plot import plot_run

    try:
        path = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"leantune plot: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
