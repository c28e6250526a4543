"""``leantune merge RUN_OR_ADAPTER_DIR [--out DIR]``: fold a peft adapter into its base model."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Merge the peft adapter of a run (LoRA, DoRA, IA3) into its base model and write a plain Hugging
Face model (safetensors + config + tokenizer) that loads without peft.

RUN_OR_ADAPTER_DIR is a run directory (its final adapter, else its newest checkpoint), a checkpoint
directory or an adapter directory (adapter_config.json). The base model is the one the adapter records:
the run's model.path, or RUN_DIR/base for runs trained from a size preset.
Default output: RUN_DIR/merged (or ADAPTER_DIR-merged outside a run).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a peft adapter into its base model (HF format)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", metavar="RUN_OR_ADAPTER_DIR")
    p.add_argument("--out", help="output directory (default: RUN_DIR/merged)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from leantune.adapters import AdapterError, is_adapter_dir, merge_adapter
    from leantune.inference import resolve_model_dir

    try:
        model_dir, run_dir = resolve_model_dir(args.adapter)
    except FileNotFoundError as err:
        print(f"leantune merge: {err}", file=sys.stderr)
        return 2
    if not is_adapter_dir(model_dir):
        print(
            f"leantune merge: {model_dir} has no adapter (adapter_config.json): only runs trained with "
            "peft.method=lora|ia3 have one to merge; a full fine-tuning run is already a plain model",
            file=sys.stderr,
        )
        return 2
    if args.out:
        out = Path(args.out)
    elif run_dir is not None:
        out = run_dir / "merged"
    else:
        out = model_dir.with_name(model_dir.name + "-merged")
    try:
        path = merge_adapter(model_dir, out, run_dir=run_dir, trust_remote_code=args.trust_remote_code)
    except (AdapterError, OSError) as err:
        print(f"leantune merge: {err}", file=sys.stderr)
        return 2
    print(f"merged {model_dir} into its base model: {path}")
    return 0
