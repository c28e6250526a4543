"""``leantune estimate``: predict the peak memory of one training step before running it."""

from __future__ import annotations

import argparse

from leantune.commands import positive_int

__all__ = ["register", "run"]

EPILOG = """\
examples:
  leantune estimate --model 8b --optim adalomo --seq 512 --dtype bf16 --grad-checkpointing
  leantune estimate --model 0.37b --optim adamw --seq 1024 --dtype mixed --budget 24GiB
  leantune estimate --model ./my-llama --optim lomo --seq 2048 --world-size 8 --strategy fsdp --json
  leantune estimate --model ./mixtral-8x7b --optim adalomo --seq 4096 --dtype bf16 --device cuda
  leantune estimate --model 70b --seq 4096 --grad-checkpointing --device cuda --world-size 8 \
      --tp 4 --pp 2 --accumulation-steps 8      # 3D: tp 4 x pp 2 x dp 1, 8 micro-batches (1F1B)

--world-size W is tp x pp x dp: with --tp N (attention and MLP matrices split over N devices,
embeddings and head whole) and --pp M (contiguous layers per stage; the micro-batches are
--accumulation-steps), --strategy applies to the dp = W / (N x M) replicas. The table is the
heaviest stage's; below it, what one device sends per step. Layouts the trainer does not run yet
(pp with tp or dp; fsdp with tp) are estimated on paper and said so.

A model directory of any family transformers knows (GPT-2, Phi-3, Mixtral, DeepSeek-V3, ...) is
read from its config.json: its own modelling code runs on fake tensors (no weights, no memory) to
count its parameters and what every layer saves for backward. Presets use the LLaMA formulas.

The estimate is the peak of one step as `leantune train` runs it: CPU resident memory (validated
against measurement, see benchmarks/results/estimate_validation.md and chunked_loss.md) or, with
--device cuda, device memory (modelled, with a guessed CUDA-context constant). The loss is
leantune's chunked linear cross-entropy (--loss-chunk 256 tokens, as train.loss_chunk; 0 = the
standard loss on full fp32 logits). On CPU it assumes glibc's mmap threshold is fixed, as
`leantune train` sets it at start-up (MALLOC_MMAP_THRESHOLD_=1048576 does the same for a plain
script); with glibc's defaults RSS ran 9-45% higher (docs/memory.md).
"""


def _tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = the standard loss), got {value}")
    return value


def _size(text: str) -> int:
    from leantune.estimate import parse_size  # torch-free module

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _optimizer(text: str) -> str:
    from leantune.estimate import canonical_optimizer

    try:
        return canonical_optimizer(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``estimate`` sub-command."""
    p = subparsers.add_parser(
        "estimate",
        help="predict peak memory per device of one training step",
        description="Predict the peak memory per device of one training step, by component, "
        "from the model's shape (no weights are loaded).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument(
        "--model", required=True, metavar="PRESET|HF_DIR", help="a size preset or a local HF directory"
    )
    p.add_argument(
        "--optim",
        type=_optimizer,
        default="adalomo",
        metavar="NAME",
        help="optimizer (adalomo, lomo, adamw, sgd, adafactor, lion, adan, <name>_in_backward) or "
        "'floor' (forward + backward, gradients dropped); default adalomo",
    )
    p.add_argument("--seq", type=positive_int, required=True, metavar="L", help="sequence length")
    p.add_argument("--batch", type=positive_int, default=1, metavar="B", help="micro-batch size per device")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16", "mixed"),
        default="bf16",
        help="weights/activations dtype; 'mixed' = fp32 weights, bf16 autocast (default bf16)",
    )
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument(
        "--padded",
        action="store_true",
        help="batches contain padding: an L x L attention mask per layer, k/v repeated to all heads",
    )
    p.add_argument(
        "--accumulation-steps",
        type=positive_int,
        default=1,
        metavar="K",
        help="micro-batches per update (with --pp: the pipeline's micro-batches)",
    )
    p.add_argument("--world-size", type=positive_int, default=1, metavar="W", help="devices: tp x pp x dp")
    p.add_argument("--tp", type=positive_int, default=1, metavar="N", help="tensor-parallel degree")
    p.add_argument("--pp", type=positive_int, default=1, metavar="M", help="pipeline stages")
    p.add_argument(
        "--schedule", choices=("1f1b", "gpipe"), default="1f1b", help="pipeline schedule (default 1f1b)"
    )
    p.add_argument(
        "--strategy",
        choices=("none", "ddp", "fsdp"),
        default=None,
        help="over the dp = W / (tp x pp) replicas; default: none, or ddp if dp > 1",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: resident memory (validated); cuda: device memory (modelled); default cpu",
    )
    p.add_argument(
        "--loss-chunk",
        type=_tokens,
        default=256,
        metavar="T",
        help="tokens per chunk of the chunked loss (train.loss_chunk, default 256); 0 = full logits",
    )
    p.add_argument("--budget", type=_size, metavar="SIZE", help="memory per device, e.g. 24GiB, 80GB, 512MiB")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the estimate (and, with ``--budget``, whether it fits). Returns 2 on bad input."""
    import json
    import sys

    from leantune.estimate import ModelShape, TrainSetup, estimate_memory, format_bytes

    def fail(message: str) -> int:
        print(f"leantune estimate: error: {message}", file=sys.stderr)
        return 2

    try:
        shape = ModelShape.resolve(args.model)
    except (ValueError, FileNotFoundError) as err:
        return fail(str(err))
    dp = args.world_size // (args.tp * args.pp) if args.world_size % (args.tp * args.pp) == 0 else 2
    strategy = args.strategy or ("ddp" if dp > 1 else "none")
    try:
        setup = TrainSetup(
            optimizer=args.optim,
            seq_len=args.seq,
            batch_size=args.batch,
            dtype=args.dtype,
            grad_checkpointing=args.grad_checkpointing,
            accumulation_steps=args.accumulation_steps,
            world_size=args.world_size,
            strategy=strategy,
            device=args.device,
            padded=args.padded,
            loss_chunk=args.loss_chunk,
            tp=args.tp,
            pp=args.pp,
            schedule=args.schedule,
        )
        result = estimate_memory(shape, setup)
    except ValueError as err:
        return fail(str(err))
    budget = args.budget
    if args.json:
        out = result.to_dict()
        if budget is not None:
            out["budget"] = budget
            out["fits"] = result.fits(budget)
            out["shortfall"] = max(0, result.total - budget)
        print(json.dumps(out, indent=2))
        return 0
    print(result.format())
    if budget is not None:
        if result.fits(budget):
            print(f"\nfits in {format_bytes(budget)} (headroom {format_bytes(budget - result.total)})")
        else:
            print(
                f"\ndoes not fit in {format_bytes(budget)} (needs {format_bytes(result.total - budget)} more)"
            )
    return 0
