"""Token-id prompts in, decoded continuations out, with a draft: what ``leantune generate`` and
``leantune eval`` call instead of :func:`leantune.evaluate.generate_texts` when given ``--draft``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from leantune.speculative.common import GenStats

__all__ = ["speculative_texts", "summarise"]


def speculative_texts(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    method: str,
    gamma: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stats: list[GenStats] | None = None,
) -> list[str]:
    """Continue each prompt with ``method`` (``ar``, ``sd`` or ``duo``), one prompt at a time; the
    decoded continuations, cut at eos. ``stats`` (a list) receives each generation's statistics."""
    from leantune.speculative import generate
    from leantune.speculative.sampling import Sampling

    sampling = Sampling(do_sample, temperature, top_p, top_k) if do_sample else Sampling()
    gen = torch.Generator().manual_seed(seed)
    was = [m.training for m in (target, draft) if m is not None]
    target.eval()
    if draft is not None:
        draft.eval()
    outs = []
    try:
        for p in prompts:
            res = generate(
                method,
                target,
                draft,
                list(p),
                max_new_tokens=max_new_tokens,
                gamma=gamma,
                sampling=sampling,
                eos_id=tokenizer.eos_token_id,
                generator=gen,
            )
            if stats is not None:
                stats.append(res.stats)
            outs.append(tokenizer.decode(res.tokens, skip_special_tokens=True))
    finally:
        for m, w in zip([m for m in (target, draft) if m is not None], was):
            m.train(w)
    return outs


def summarise(stats: Sequence[GenStats]) -> str:
    """One line: tokens/s, acceptance rate, tokens per target forward, mean TTFT."""
    tokens = sum(s.new_tokens for s in stats)
    wall = sum(s.wall_s for s in stats)
    drafted = sum(s.drafted for s in stats)
    acc = sum(s.accepted for s in stats) / drafted if drafted else 0.0
    fwd = sum(s.target_forwards for s in stats)
    ttft = [s.ttft_s for s in stats if s.ttft_s is not None]
    return (
        f"{stats[0].method}: {tokens} tokens in {wall:.2f} s ({tokens / max(wall, 1e-9):.1f} tokens/s), "
        f"acceptance {acc:.0%}, {tokens / max(fwd, 1):.2f} tokens per target forward, "
        f"time to first token {1e3 * sum(ttft) / max(len(ttft), 1):.1f} ms"
    )
