"""The ``leantune`` command line: one sub-command per module in :mod:`leantune.commands`.

Sub-command modules import only ``argparse`` at module level and load torch/transformers inside
their handler, so ``leantune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main", "build_parser"]

# Order = order in ``leantune --help``.
COMMANDS = ("train", "eval", "generate", "serve", "plot", "config", "data", "estimate", "rope", "merge")

EPILOG = """\
examples:
  leantune train                                   # the built-in default job (~2 min on 2 CPU cores)
  leantune train my.yaml optim.name=adamw optim.lr=3e-4
  leantune train model.path=runs/RUN/final train.objective=ppo   # PPO (rl.*; MA-RLHF: rl.macro_action)
  leantune eval runs/RUN                           # loss, perplexity, task accuracy
  leantune generate runs/RUN "sort 8213"           # -> 1238 after the default job
  leantune serve runs/RUN                          # OpenAI-compatible API + chat page on 127.0.0.1:8000
  leantune plot runs/RUN                           # PNG of loss / eval / lr / tokens-per-second
  leantune config                                  # every config field, documented
  leantune data inspect chats.jsonl --set data.max_length=512   # format, lengths, loss mask
  leantune estimate --model 8b --optim adalomo --seq 512 --dtype bf16 --grad-checkpointing
  leantune rope --head-dim 128 --train-len 4096 --base 10000 --target-len 16384
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leantune",
        description="Full-parameter LLM training on limited hardware (LOMO / AdaLomo and friends).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    from leantune import __version__

    parser.add_argument("--version", action="version", version=f"leantune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"leantune.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"leantune.commands.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    return parser


def _quiet_and_offline() -> None:
    # Nothing is ever fetched from a hub at run time, and library progress bars (weight loading and
    # writing) would only clutter leantune's own output.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_and_offline()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
