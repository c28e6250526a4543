"""``leantune eval CHECKPOINT``: loss, perplexity and exact match; passkey and position probes."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Evaluate the model in CHECKPOINT (a run directory, a checkpoint directory or a local Hugging Face
model directory).

  --task default       eval loss, perplexity and exact-match accuracy (tasks with answers) on the
                       run's evaluation data, or on --data FILE (.jsonl/.json/.parquet)
  --task passkey       needle-in-a-haystack retrieval accuracy per length x depth, with a heatmap
  --task position-ppl  perplexity by position bucket on held-out text (--data, text format)
"""


def _ints(text: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _depths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (loss, perplexity, accuracy; passkey)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint")
    p.add_argument("--task", choices=["default", "passkey", "position-ppl"], default="default")
    p.add_argument("--data", help="evaluation data file (default: the run's eval set, or built-in tasks)")
    p.add_argument("--max-length", type=int, help="max sequence length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--accuracy-samples", type=int, default=400, help="examples scored by exact match (0 = skip)"
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lengths", type=_ints, default=[256, 512, 1024], help="passkey / position-ppl lengths")
    p.add_argument("--depths", type=_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="passkey depths")
    p.add_argument("--samples-per-cell", type=int, default=5, help="passkey prompts per length x depth")
    p.add_argument(
        "--no-header",
        action="store_true",
        help="passkey prompts without the task instruction (shorter prompts, e.g. byte-level tokenizers)",
    )
    p.add_argument("--bucket", type=int, default=128, help="position-ppl bucket size in tokens")
    p.add_argument("--out", help="where to write the heatmap / JSON (default: next to the model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leantune.data import DataError
    from leantune.inference import load_for_inference, resolve_device

    try:
        device = resolve_device(args.device)
        loaded = load_for_inference(args.checkpoint, device=device)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"leantune eval: {err}", file=sys.stderr)
        return 2
    try:
        if args.task == "passkey":
            return _passkey(args, loaded)
        if args.task == "position-ppl":
            return _position_ppl(args, loaded, device)
        return _default(args, loaded, device)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"leantune eval: {err}", file=sys.stderr)
        return 2


def _out_path(args: argparse.Namespace, loaded, name: str):
    from pathlib import Path

    if args.out:
        return Path(args.out)
    base = loaded.run_dir if loaded.run_dir is not None else loaded.model_dir
    return base / name


def _default(args: argparse.Namespace, loaded, device) -> int:
    import dataclasses

    from leantune.config import DataConfig
    from leantune.data import build_datasets, encode_records, read_records
    from leantune.evaluate import eval_loss, exact_match

    data_cfg = loaded.run_config.data if loaded.run_config is not None else DataConfig()
    if args.max_length:
        data_cfg = dataclasses.replace(data_cfg, max_length=args.max_length)
    if args.data:
        records, where, fmt = read_records(args.data, data_cfg.format, data_cfg.columns)
        samples, _ = encode_records(
            records,
            where,
            fmt,
            loaded.tokenizer,
            max_length=data_cfg.max_length,
            overlong="truncate",
            pack=data_cfg.pack is not False,
        )
        source = args.data
    else:
        samples = build_datasets(data_cfg, loaded.tokenizer).eval
        source = (
            "built-in held-out tasks" if data_cfg.train == "builtin" else f"held-out part of {data_cfg.train}"
        )
    pad = loaded.tokenizer.pad_token_id
    values = eval_loss(loaded.model, samples, batch_size=args.batch_size, pad_id=pad, device=device)
    if args.accuracy_samples:
        values.update(
            exact_match(
                loaded.model,
                loaded.tokenizer,
                samples,
                device=device,
                max_new_tokens=args.max_new_tokens,
                limit=args.accuracy_samples,
            )
        )
    print(f"model: {loaded.model_dir}\ndata: {source} ({len(samples)} sequences)")
    print(f"eval loss   {values['eval_loss']:.4f}\nperplexity  {values['eval_ppl']:.3f}")
    for key, value in values.items():
        if key.startswith("acc/"):
            print(f"exact match {key[4:]:<10} {value:.1%}")
    if "acc" in values:
        print(f"exact match {'all':<10} {values['acc']:.1%} of {values['acc_samples']}")
    return 0


def _passkey(args: argparse.Namespace, loaded) -> int:
    from leantune.longctx import evaluate_passkey, plot_passkey_heatmap
    from leantune.longctx.passkey import HEADER

    grid = evaluate_passkey(
        loaded.model,
        loaded.tokenizer,
        args.lengths,
        args.depths,
        samples_per_cell=args.samples_per_cell,
        seed=args.seed,
        add_bos=loaded.tokenizer.bos_token_id is not None,
        header=None if args.no_header else HEADER,
    )
    print(grid.format())
    png = _out_path(args, loaded, "passkey.png")
    if png.suffix != ".png":
        png = png / "passkey.png"
    plot_passkey_heatmap(grid, png, title=f"passkey retrieval: {loaded.model_dir}")
    png.with_suffix(".json").write_text(grid.to_json())
    print(f"heatmap: {png}\ngrid:    {png.with_suffix('.json')}")
    return 0


def _position_ppl(args: argparse.Namespace, loaded, device) -> int:
    import torch

    from leantune.data import load_records
    from leantune.longctx import perplexity_by_position

    if not args.data:
        raise ValueError("--task position-ppl needs --data FILE with held-out text records ({'text': ...})")
    records, _ = load_records(args.data)
    tok = loaded.tokenizer
    stream: list[int] = []
    for rec in records:
        if not isinstance(rec.get("text"), str):
            raise ValueError(f"{args.data}: position-ppl needs text records with a 'text' field")
        stream += tok(rec["text"])["input_ids"] + [tok.eos_token_id]
    results = {}
    for length in args.lengths:
        n = len(stream) // length
        if n == 0:
            print(f"length {length}: skipped, the text has only {len(stream)} tokens")
            continue
        ids = torch.tensor(stream[: n * length]).view(n, length)[:8].to(device)
        buckets = perplexity_by_position(loaded.model, ids, args.bucket)
        results[length] = [b._asdict() for b in buckets]
        print(f"length {length} ({ids.shape[0]} sequences):")
        for b in buckets:
            print(f"  positions {b.start:>6}-{b.end:<6} loss {b.mean_nll:.4f}  ppl {b.perplexity:.3f}")
    if not results:
        raise ValueError(f"{args.data}: {len(stream)} tokens, fewer than the shortest of --lengths")
    out = _out_path(args, loaded, "position_ppl.json")
    if out.suffix != ".json":
        out = out / "position_ppl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written: {out}")
    return 0
