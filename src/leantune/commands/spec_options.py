"""The speculative-decoding options shared by ``generate`` and ``eval`` (not a sub-command)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_speculative_options", "load_draft"]


def _gamma(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def add_speculative_options(p: argparse.ArgumentParser) -> None:
    """Add ``--draft --decoding --gamma --draft-device`` to ``p`` (see docs/speculative.md)."""
    g = p.add_argument_group("speculative decoding (docs/speculative.md)")
    g.add_argument(
        "--draft",
        metavar="DRAFT_RUN",
        help="a small model with the same tokenizer (run, checkpoint or HF directory) that proposes "
        "tokens for the model to verify; output is unchanged (greedy: identical; sampling: same law)",
    )
    g.add_argument(
        "--decoding",
        choices=["ar", "sd", "duo"],
        help="ar: one model forward per token; sd: standard speculative decoding; duo: DuoDecoding, "
        "draft and model run concurrently with multi-sequence drafts (default with --draft: duo)",
    )
    g.add_argument(
        "--gamma",
        type=_gamma,
        default="auto",
        help="draft tokens per round, or auto: sd 5, duo the profiled gamma* = T_verify / t_draft",
    )
    g.add_argument("--draft-device", default="cpu", help="device of the draft (default cpu)")
    g.add_argument(
        "--spec-stats", action="store_true", help="print acceptance rate, tokens/s and time to first token"
    )


def load_draft(args: argparse.Namespace, loaded: Any, prog: str) -> tuple[Any, str, int] | int:
    """The draft model, the method and gamma for ``args``; or an exit code (2) after a message.

    Without ``--draft``: ``(None, 'ar', 0)`` when ``--decoding`` is unset or ``ar``."""
    method = args.decoding or ("duo" if args.draft else "ar")
    if method == "ar" and not args.draft:
        return None, "ar", 0
    if not args.draft:
        print(f"{prog}: --decoding {method} needs --draft DRAFT_RUN", file=sys.stderr)
        return 2
    from leantune.inference import load_for_inference, resolve_device
    from leantune.speculative import IncompatibleDraftError, check_compatible, profile_models

    try:
        draft = load_for_inference(args.draft, device=resolve_device(args.draft_device))
        check_compatible(loaded.model, draft.model, loaded.tokenizer, draft.tokenizer)
    except IncompatibleDraftError as err:
        print(f"{prog}: --draft {args.draft}: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"{prog}: --draft: {err}", file=sys.stderr)
        return 2
    gamma = args.gamma
    if gamma == "auto":
        if method == "duo":
            prof = profile_models(loaded.model, draft.model)
            print(f"profile: {prof.describe()}", file=sys.stderr)
            gamma = prof.gamma
        else:
            gamma = 5
    return draft.model, method, int(gamma)
