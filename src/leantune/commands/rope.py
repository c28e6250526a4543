"""``leantune rope``: which RoPE base a context length needs (scaling laws of RoPE extrapolation)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]

DESCRIPTION = """\
Critical dimension, extrapolation bound, critical base and the smallest rotary base for a target
context, from "Scaling Laws of RoPE-based Extrapolation" (Liu et al. 2023, arXiv 2310.05209).
Closed-form arithmetic: no model is loaded.

Give the shape either explicitly (--head-dim, --train-len, --base) or with --model, which reads
head_dim, max_position_embeddings (= train length) and rope_theta (= pretraining and, unless
--base is given, current base) from the model's config.json; explicit flags override it.
"""

EPILOG = """\
examples:
  leantune rope --head-dim 128 --train-len 4096 --base 10000            # LLaMA 2 as pretrained
  leantune rope --head-dim 128 --train-len 4096 --base 1e6 --tune-len 16384 --target-len 100000
  leantune rope --model path/to/llama-2-7b --base 1e6 --tune-len 16384 --plot periods.png
"""


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _length(text: str) -> int:
    value = _number(text)  # accepts 1e6 as well as 1000000
    if value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens, got {text!r}")
    return int(value)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "rope",
        help="RoPE base vs context length: critical dimension, bounds, the base a target length needs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_argument_group("model shape (give --model, or all of --head-dim --train-len --base)")
    src.add_argument("--model", metavar="HF_DIR", help="local Hugging Face model directory (or config.json)")
    src.add_argument("--head-dim", type=int, metavar="D", help="attention head size d")
    src.add_argument("--train-len", type=_length, metavar="T", help="pretraining context length T_train")
    src.add_argument("--base", type=_number, metavar="B", help="rotary base used in tuning / inference")
    src.add_argument(
        "--pretrain-base",
        type=_number,
        metavar="B0",
        help="rotary base used in pretraining (default: the config's rope_theta with --model, else 10000)",
    )
    what = parser.add_argument_group("question")
    what.add_argument("--tune-len", type=_length, metavar="T2", help="context length the model is tuned at")
    what.add_argument("--target-len", type=_length, metavar="L", help="context length you want to reach")
    what.add_argument("--plot", metavar="PATH.png", help="also write a PNG of the per-dimension periods")
    parser.set_defaults(func=run, _rope_parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from leantune.longctx.rope import (
        PAPER_PRETRAIN_BASE,
        plot_periods,
        rope_params_from_hf_config,
        rope_report,
    )

    parser: argparse.ArgumentParser | None = getattr(args, "_rope_parser", None)

    def fail(message: str) -> int:
        if parser is not None:
            parser.error(message)  # prints usage, exits with status 2
        raise SystemExit(f"leantune rope: error: {message}")

    head_dim, train_len, base, pretrain_base = args.head_dim, args.train_len, args.base, args.pretrain_base
    if args.model is not None:
        try:
            cfg_dim, cfg_len, cfg_theta = rope_params_from_hf_config(
                args.model, default_rope_theta=pretrain_base
            )
        except (FileNotFoundError, ValueError) as err:
            return fail(f"--model: {err}")
        head_dim = cfg_dim if head_dim is None else head_dim
        train_len = cfg_len if train_len is None else train_len
        pretrain_base = cfg_theta if pretrain_base is None else pretrain_base
        base = cfg_theta if base is None else base
    else:
        missing = [
            flag
            for flag, v in (("--head-dim", head_dim), ("--train-len", train_len), ("--base", base))
            if v is None
        ]
        if missing:
            flags = ", ".join(missing)
            return fail(
                f"give --model HF_DIR, or all of --head-dim, --train-len and --base (missing {flags})"
            )
        pretrain_base = PAPER_PRETRAIN_BASE if pretrain_base is None else pretrain_base

    try:
        report = rope_report(
            head_dim, train_len, base, args.tune_len, args.target_len, pretrain_base=pretrain_base
        )
    except ValueError as err:
        # The library names its arguments; the user typed flags.
        message = str(err)
        for name in ("head_dim", "train_len", "tune_len", "target_len", "pretrain_base"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        return fail(message)
    print(report.format())
    if args.plot:
        path = plot_periods(head_dim, base, train_len, args.plot, pretrain_base=pretrain_base)
        print(f"wrote {path}")
    return 0
