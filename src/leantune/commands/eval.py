"""``leantune eval CHECKPOINT``: loss, perplexity and exact match; passkey, recall and position probes."""

from __future__ import annotations

import argparse
import json
import sys

from leantune.commands import positive_int
from leantune.commands.kv_options import add_kv_options, kv_policy_from_args
from leantune.commands.spec_options import add_speculative_options, load_draft

DESCRIPTION = """\
Evaluate the model in CHECKPOINT (a run directory, a checkpoint directory or a local Hugging Face
model directory).

  --task default       eval loss, perplexity and exact-match accuracy (tasks with answers) on the
                       run's evaluation data, or on --data FILE (.jsonl/.json/.parquet)
  --task passkey       needle-in-a-haystack retrieval accuracy per length x depth, with a heatmap
  --task recall        multi-query associative recall (the built-in `recall` task's prompts) per
                       prompt length (default: 1, 2, 4 and 8 times the task's length), with the
                       KV-cache bytes kept after the prefill; --late-queries asks the keys only
                       after the prefill's eviction
  --task position-ppl  perplexity by position bucket on held-out text (--data, text format)
  --task preference    implicit-reward accuracy, margin and win rate of the chosen completion on
                       prompt/chosen/rejected pairs (--data, or the run's held-out pairs)

--kv-policy (nacl, streaming, random, longcache) applies to --task passkey and --task recall: see
docs/kv-cache.md.
"""


DEFAULT_LENGTHS = [256, 512, 1024]  # passkey and position-ppl


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
    p.add_argument(
        "--task", choices=["default", "passkey", "recall", "position-ppl", "preference"], default="default"
    )
    p.add_argument("--data", help="evaluation data file (default: the run's eval set, or built-in tasks)")
    p.add_argument("--max-length", type=int, help="max sequence length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--accuracy-samples", type=int, default=400, help="examples scored by exact match (0 = skip)"
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--lengths",
        type=_ints,
        help="passkey / position-ppl lengths (default 256,512,1024); recall prompt lengths in characters "
        "(default: 1, 2, 4, 8 x the recall task's)",
    )
    p.add_argument("--depths", type=_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="passkey depths")
    p.add_argument(
        "--samples-per-cell",
        type=positive_int,
        help="passkey prompts per length x depth (default 5); recall prompts per length (default 100)",
    )
    p.add_argument(
        "--pairs", type=positive_int, help="recall: key-value pairs per prompt (default: the task's)"
    )
    p.add_argument(
        "--queries", type=positive_int, help="recall: keys queried per prompt (default: the task's)"
    )
    p.add_argument(
        "--late-queries",
        action="store_true",
        help="recall: prefill the filler and pairs only, then feed the queried keys through the kept "
        "cache (the policy evicts without knowing the question)",
    )
    p.add_argument(
        "--no-header",
        action="store_true",
        help="passkey prompts without the task instruction (shorter prompts, e.g. byte-level tokenizers)",
    )
    p.add_argument("--bucket", type=int, default=128, help="position-ppl bucket size in tokens")
    p.add_argument(
        "--reference",
        help="preference: the reference model directory of DPO/IPO's implicit reward (default: the run's "
        "initial model: model.path, the base of an adapter, or the preset's seeded init)",
    )
    p.add_argument(
        "--objective",
        choices=["dpo", "ipo", "simpo", "orpo"],
        help="preference: the implicit reward to score (default: the run's train.objective, else dpo)",
    )
    p.add_argument("--out", help="where to write the heatmap / JSON (default: next to the model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_kv_options(p)
    add_speculative_options(p)  # exact-match generation of --task default
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leantune.data import DataError
    from leantune.inference import load_for_inference, resolve_device

    try:
        kv = kv_policy_from_args(args)  # bad --kv-* options fail before the model loads
        if kv.policy != "full" and args.task not in ("passkey", "recall"):
            raise ValueError(
                f"--kv-policy {kv.policy} applies to --task passkey and recall, not --task {args.task}"
            )
        if (args.pairs or args.queries or args.late_queries) and args.task != "recall":
            raise ValueError(
                f"--pairs / --queries / --late-queries apply to --task recall, not --task {args.task}"
            )
        if (args.draft or args.decoding) and args.task != "default":
            raise ValueError(f"--draft / --decoding apply to --task default, not --task {args.task}")
        device = resolve_device(args.device)
        loaded = load_for_inference(args.checkpoint, device=device)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"leantune eval: {err}", file=sys.stderr)
        return 2
    try:
        if args.task == "passkey":
            return _passkey(args, loaded, kv)
        if args.task == "recall":
            return _recall(args, loaded, kv)
        if args.task == "position-ppl":
            return _position_ppl(args, loaded, device)
        if args.task == "preference":
            return _preference(args, loaded, device)
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
    texts_fn, spec_stats = None, []
    if args.accuracy_samples and (args.draft or args.decoding):
        spec = load_draft(args, loaded, "leantune eval")
        if isinstance(spec, int):
            return spec
        from leantune.speculative.text import speculative_texts

        def texts_fn(prompts):  # greedy, as exact match always is
            return speculative_texts(
                loaded.model,
                spec[0],
                loaded.tokenizer,
                prompts,
                method=spec[1],
                gamma=spec[2],
                max_new_tokens=args.max_new_tokens,
                stats=spec_stats,
            )

    if args.accuracy_samples:
        values.update(
            exact_match(
                loaded.model,
                loaded.tokenizer,
                samples,
                device=device,
                max_new_tokens=args.max_new_tokens,
                limit=args.accuracy_samples,
                texts_fn=texts_fn,
            )
        )
    print(f"model: {loaded.model_dir}\ndata: {source} ({len(samples)} sequences)")
    print(f"eval loss   {values['eval_loss']:.4f}\nperplexity  {values['eval_ppl']:.3f}")
    for key, value in values.items():
        if key.startswith("acc/"):
            print(f"exact match {key[4:]:<10} {value:.1%}")
    if "acc" in values:
        print(f"exact match {'all':<10} {values['acc']:.1%} of {values['acc_samples']}")
    if spec_stats and args.spec_stats:
        from leantune.speculative.text import summarise

        print(summarise(spec_stats))
    return 0


def _passkey(args: argparse.Namespace, loaded, kv) -> int:
    from leantune.longctx import evaluate_passkey, plot_passkey_heatmap
    from leantune.longctx.passkey import HEADER

    grid = evaluate_passkey(
        loaded.model,
        loaded.tokenizer,
        args.lengths or DEFAULT_LENGTHS,
        args.depths,
        samples_per_cell=args.samples_per_cell or 5,
        seed=args.seed,
        add_bos=loaded.tokenizer.bos_token_id is not None,
        header=None if args.no_header else HEADER,
        kv=kv,
    )
    if kv.policy != "full":
        print(f"kv policy: {kv.policy}" + (f", budget {kv.budget}" if kv.budget is not None else ""))
    print(grid.format())
    png = _out_path(args, loaded, "passkey.png")
    if png.suffix != ".png":
        png = png / "passkey.png"
    plot_passkey_heatmap(grid, png, title=f"passkey retrieval: {loaded.model_dir}")
    png.with_suffix(".json").write_text(grid.to_json())
    print(f"heatmap: {png}\ngrid:    {png.with_suffix('.json')}")
    return 0


def _recall(args: argparse.Namespace, loaded, kv) -> int:
    from leantune.data.tasks import RECALL_LENGTH, RECALL_PAIRS, RECALL_QUERIES
    from leantune.longctx.recall import evaluate_recall

    lengths = args.lengths or [RECALL_LENGTH * k for k in (1, 2, 4, 8)]
    result = evaluate_recall(
        loaded.model,
        loaded.tokenizer,
        lengths,
        samples=args.samples_per_cell or 100,
        seed=args.seed,
        pairs=args.pairs or RECALL_PAIRS,
        queries=args.queries or RECALL_QUERIES,
        kv=kv,
        late_queries=args.late_queries,
    )
    print(result.format())
    out = _out_path(args, loaded, "recall.json")
    if out.suffix != ".json":
        out = out / "recall.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.to_json())
    print(f"written: {out}")
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
    for length in args.lengths or DEFAULT_LENGTHS:
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


def _preference_reference(args: argparse.Namespace, loaded, device):
    """The reference of DPO/IPO's implicit reward: --reference, the adapter's base (adapter
    disabled), the run's model.path, or the preset's init rebuilt from the run's seed."""
    from transformers import AutoModelForCausalLM

    from leantune.models import build_model, check_model_dir, resolve_dtype

    cfg = loaded.run_config
    if not args.reference and hasattr(loaded.model, "disable_adapter"):
        return "adapter", "the base model (adapter disabled)"
    if not args.reference and cfg is None:
        raise ValueError("--task preference on a model outside a run needs --reference DIR (the reference)")
    path = args.reference or cfg.model.path
    if path:
        check_model_dir(path, "--reference")
        ref = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
        return ref.to(device).eval(), path
    ref = build_model(preset=cfg.model.preset, dtype=resolve_dtype(cfg.model.dtype),
                      vocab_size=len(loaded.tokenizer), seed=cfg.train.seed)  # fmt: skip
    return ref.to(device).eval(), f"the initial {cfg.model.preset} model (seed {cfg.train.seed})"


def _preference(args: argparse.Namespace, loaded, device) -> int:
    import dataclasses

    from leantune.config import DataConfig
    from leantune.data.pairs import build_pair_datasets, read_pairs
    from leantune.objectives import NEEDS_REFERENCE
    from leantune.objectives.dpo import score_pairs

    cfg = loaded.run_config
    data_cfg = cfg.data if cfg is not None else DataConfig()
    if args.max_length:
        data_cfg = dataclasses.replace(data_cfg, max_length=args.max_length)
    if args.data:  # every pair of the file is scored
        pairs, _ = read_pairs(args.data, dataclasses.replace(data_cfg, format="auto"), loaded.tokenizer)
    elif data_cfg.train == "builtin":
        raise ValueError("--task preference needs --data FILE with prompt/chosen/rejected records")
    else:  # the run's held-out pairs, split as in training
        pairs = build_pair_datasets(data_cfg, loaded.tokenizer).eval
    run_kind = cfg.train.objective if cfg is not None else "sft"
    kind = args.objective or (run_kind if run_kind != "sft" else "dpo")
    reference, described = None, "none"
    if NEEDS_REFERENCE[kind]:
        reference, described = _preference_reference(args, loaded, device)
    d = cfg.dpo if cfg is not None else None
    hyper = {k: getattr(d, k) for k in ("beta", "label_smoothing", "gamma", "orpo_lambda")} if d else {}
    values = score_pairs(loaded.model, pairs, kind=kind, reference=reference, batch_size=args.batch_size,
                         pad_id=loaded.tokenizer.pad_token_id, device=device, **hyper)  # fmt: skip
    source = args.data or f"held-out pairs of {data_cfg.train}"
    print(f"model: {loaded.model_dir}\ndata: {source} ({values['pairs']} pairs)\nreference: {described}")
    print(f"implicit-reward accuracy ({kind})  {values['reward_accuracy']:.1%}")
    print(f"mean reward margin ({kind})        {values['margin']:.4f}")
    print(f"win rate of the chosen completion   {values['win_rate']:.1%} (summed log-prob), "
          f"{values['win_rate_per_token']:.1%} (per token)")  # fmt: skip
    return 0
