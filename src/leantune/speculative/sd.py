"""Plain autoregressive decoding and standard speculative decoding (Leviathan et al. 2023, Alg. 1;
Chen et al. 2023), one prompt at a time, with both models' KV caches.

One SD round, with ``seq`` the committed sequence (prompt + accepted tokens):

1. the draft feeds its uncached suffix of ``seq`` and proposes ``x_1..x_g`` autoregressively,
   ``x_i ~ q_i`` (its processed distribution), ``g`` forwards;
2. the target scores ``seq + x_1..x_g`` in **one** forward: ``p_1..p_{g+1}``;
3. ``x_i`` is kept with probability ``min(1, p_i(x_i)/q_i(x_i))`` left to right; the first rejection
   emits a draw from ``norm(max(0, p_i - q_i))``, all accepted emits a bonus draw from ``p_{g+1}``
   (:mod:`leantune.speculative.sampling`), so every round commits ``1..g+1`` tokens distributed
   exactly as the target's sampler would;
4. both caches are cropped back to ``seq + accepted draft tokens`` (positions of rejected drafts
   are dropped; the emitted correction is fed next round as part of the uncached suffix).

Expected tokens per target forward with acceptance rate ``a``: ``(1 - a^(g+1)) / (1 - a)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from leantune.speculative.clock import AnyClock
from leantune.speculative.common import DraftError, GenResult, GenStats, Runner, done, finish
from leantune.speculative.sampling import GREEDY, Sampling, processed_probs, sample_token, verify_tokens

__all__ = ["ar_generate", "sd_generate"]


@torch.no_grad()
def ar_generate(
    target: torch.nn.Module,
    prompt: list[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    clock: AnyClock | None = None,
) -> GenResult:
    """The baseline: one target forward per token (with the KV cache), same sampler as SD."""
    tr = Runner(target, "target", clock)
    stats = GenStats("ar")
    seq, new = list(prompt), []
    t0 = time.perf_counter()
    while not done(new, max_new_tokens, eos_id):
        logits = tr.feed(seq)[-1]
        tok = sample_token(processed_probs(logits, sampling), sampling, generator)
        seq.append(tok)
        new.append(tok)
        stats.accept_lengths.append(1)
        if clock is not None:
            clock.sync()
        if stats.ttft_s is None:
            stats.ttft_s = time.perf_counter() - t0
            stats.virtual_ttft_s = clock.now if clock is not None else None
    stats.rounds = stats.target_forwards = tr.forwards
    return _close(stats, new, max_new_tokens, eos_id, t0, clock)


def _close(
    stats: GenStats, new: list[int], max_new: int, eos_id: int | None, t0: float, clock: AnyClock | None
) -> GenResult:
    stats.wall_s = time.perf_counter() - t0
    out = finish(new, max_new, eos_id)
    stats.new_tokens = len(out)
    if clock is not None:
        stats.virtual_s = clock.now
    return GenResult(out, stats)


@torch.no_grad()
def sd_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompt: list[int],
    *,
    max_new_tokens: int,
    gamma: int = 5,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    clock: AnyClock | None = None,
    on_round: Callable[[list[int], list[int], Runner, Runner], None] | None = None,
) -> GenResult:
    """Standard speculative decoding of ``prompt`` (token ids, batch size 1); see the module docstring.

    ``on_round(seq, tail, target_runner, draft_runner)`` is called after every round (for tests:
    the caches then hold prefixes of ``seq``; ``tail`` is always empty here).

    Raises:
        DraftError: the draft failed (the target, whose cache lives in this call only, stays usable).
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    tr, dr = Runner(target, "target", clock), Runner(draft, "draft", clock)
    stats = GenStats("sd", gamma=gamma)
    seq, new = list(prompt), []
    t0 = time.perf_counter()
    while not done(new, max_new_tokens, eos_id):
        g = min(gamma, max_new_tokens - len(new))  # drafting past the end is wasted work
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        try:
            logits = dr.feed(seq)[-1]
            for i in range(g):
                q = processed_probs(logits, sampling)
                x = sample_token(q, sampling, generator)
                drafts.append(x)
                qs.append(q)
                if i + 1 < g:
                    logits = dr.forward([x])[-1]
        except Exception as err:
            raise DraftError(f"the draft model failed: {type(err).__name__}: {err}") from err
        if clock is not None:
            clock.sync()  # sequential: the target waits for the drafts
        p_rows = processed_probs(tr.feed(seq + drafts)[-(g + 1) :], sampling)
        if clock is not None:
            clock.sync()
        n, tok = verify_tokens(p_rows[:g], torch.stack(qs), drafts, sampling, generator)
        if tok is None:
            tok = sample_token(p_rows[g], sampling, generator)
        base = len(seq)
        committed = drafts[:n] + [tok]
        seq += committed
        new += committed
        tr.rollback(base + n)
        dr.rollback(base + n)
        stats.rounds += 1
        stats.drafted += g
        stats.accepted += n
        stats.accept_lengths.append(len(committed))
        if stats.ttft_s is None:
            stats.ttft_s = time.perf_counter() - t0
            stats.virtual_ttft_s = clock.now if clock is not None else None
        if on_round is not None:
            on_round(seq, [], tr, dr)
    stats.target_forwards, stats.draft_forwards = tr.forwards, dr.forwards
    return _close(stats, new, max_new_tokens, eos_id, t0, clock)
