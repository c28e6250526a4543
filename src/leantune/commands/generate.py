"""``leantune generate CHECKPOINT "prompt"``."""

from __future__ import annotations

import argparse
import sys

from leantune.commands.kv_options import add_kv_options, kv_policy_from_args
from leantune.commands.spec_options import add_speculative_options, load_draft


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained model",
        description="Continue PROMPT with the model in CHECKPOINT (a run directory, a checkpoint "
        "or any local Hugging Face model directory). Greedy by default; --sample for sampling. "
        "Built-in task prompts end with a newline, e.g. $'add 12+34\\n'; a prompt given without "
        "one gets it added for runs trained on the built-in tasks.",
    )
    p.add_argument("checkpoint", help="run directory, checkpoint directory or HF model directory")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    p.add_argument("--device", default="auto")
    add_kv_options(p)
    add_speculative_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from leantune.data import chat_prompt_ids
    from leantune.evaluate import generate_texts
    from leantune.inference import load_for_inference, resolve_device

    if args.max_new_tokens < 1:
        print("leantune generate: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        kv = kv_policy_from_args(args)  # bad --kv-* options fail before the model loads
        device = resolve_device(args.device)
        loaded = load_for_inference(args.checkpoint, device=device)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"leantune generate: {err}", file=sys.stderr)
        return 2
    if (args.draft or args.decoding) and kv.policy != "full":
        print("leantune generate: --draft / --decoding work with --kv-policy full only", file=sys.stderr)
        return 2
    spec = load_draft(args, loaded, "leantune generate")
    if isinstance(spec, int):
        return spec
    tok = loaded.tokenizer
    builtin = loaded.run_config is not None and loaded.run_config.data.train == "builtin"
    prompts = []
    for text in args.prompt:
        if args.chat:
            ids = chat_prompt_ids(tok, [{"role": "user", "content": text}])
        else:
            if builtin and not text.endswith("\n"):
                text += "\n"
            ids = tok(text)["input_ids"]
        prompts.append(list(ids))
    torch.manual_seed(args.seed)
    if spec[1] != "ar" or args.decoding == "ar":
        from leantune.speculative.text import speculative_texts, summarise

        stats: list = []
        outs = speculative_texts(
            loaded.model,
            spec[0],
            tok,
            prompts,
            method=spec[1],
            gamma=spec[2],
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stats=stats,
        )
        if args.spec_stats:
            print(summarise(stats), file=sys.stderr)
        _print(args, outs)
        return 0
    try:
        outs = generate_texts(
            loaded.model,
            tok,
            prompts,
            device=device,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            kv=kv,
        )
    except ValueError as err:  # e.g. a fractional --kv-budget below sink + recent for this prompt
        print(f"leantune generate: {err}", file=sys.stderr)
        return 2
    _print(args, outs)
    return 0


def _print(args: argparse.Namespace, outs: list[str]) -> None:
    for text, out in zip(args.prompt, outs):
        if len(args.prompt) > 1:
            print(f"### {text!r}")
        print(out if out else "(empty: the model ended its answer at once)")
