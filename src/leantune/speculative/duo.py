"""DuoDecoding (Lv et al. 2025, arXiv 2503.00784): the draft and the target run *concurrently*,
with dynamic multi-sequence drafting; lossless for greedy decoding and sampling alike.

State: the committed sequence ``seq`` and a *tail*, the unverified rest of the draft sequence
chosen last round. Each round, at the same time (two threads; torch releases the GIL inside its
ops, so the two forwards overlap):

* **target**: one forward over its uncached suffix of ``seq + tail``: ``p`` at every tail position
  and ``p_next``, the distribution after the whole tail;
* **draft**: assuming the tail will be accepted, drafts from ``seq + tail`` ``k`` greedy sequences
  totalling ``gamma`` tokens (:func:`draft_sequences`).

Then, on the target's side:

* the tail is verified with a one-hot ``q`` (the drafts are greedy): ``tail[i]`` is kept with
  probability ``p_i(tail[i])``; the first rejection emits a draw from ``p_i`` without
  ``tail[i]``, renormalised, and this round's drafts are discarded (they assumed the tail);
* all kept: the first-token check draws ``t ~ p_next`` (greedy: ``argmax``) and commits it; if a
  draft sequence starts with ``t`` its rest becomes the next tail (the draft restores that
  sequence's KV snapshot), else the tail is empty. This is exact because the committed token *is*
  the target's draw (the released code, greedy-only, accepts sequence 1 with probability
  ``p(x_1)``, which is not lossless under sampling).

Exactly one sequence is ever verified: the other ``k - 1`` cost the target nothing, and the choice
uses ``p_next``, which the target computed anyway. Round 1 drafts a budget of 1 token so that the
first token costs ``max(target prefill, draft prefill + 1 token)``, not their sum as in SD.

Dynamic ``k`` (``generate_k_seq`` in the released code): draft ``x_1, x_2`` greedily, set
``theta = p_{1,1} p_{2,1}`` (the top probabilities at positions 1 and 2); ``k = 1 +`` the number of
consecutive ranks ``j = 2..8`` at position 1 with ``p_{1,j} > theta``, snapped down to a divisor of
``gamma``; each sequence has ``L = gamma / k`` tokens: sequence 1 is ``x_1, x_2, ...`` greedy,
sequence ``j`` starts with the rank-``j`` token and continues greedily.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from leantune.speculative.clock import AnyClock
from leantune.speculative.common import DraftError, GenResult, GenStats, Runner, done, finish
from leantune.speculative.sampling import GREEDY, Sampling, choose_sequence, processed_probs, verify_tokens

__all__ = ["Drafts", "draft_sequences", "duo_generate", "num_sequences", "snap_k"]


def snap_k(k: int, gamma: int, max_seqs: int = 8) -> int:
    """The largest divisor of ``gamma`` that is ``<= min(k, max_seqs)`` (gamma 24: 5 -> 4, 7 -> 6;
    gamma 16: 3 -> 2, 5..7 -> 4), so that ``k`` sequences of ``gamma / k`` tokens fill the budget."""
    k = max(1, min(k, max_seqs, gamma))
    while gamma % k:
        k -= 1
    return k


def num_sequences(p1: torch.Tensor, top2: float, max_seqs: int = 8) -> int:
    """``1 +`` consecutive ranks ``j >= 2`` (up to ``max_seqs``) with ``p1[rank j] > p_{1,1} * top2``.

    ``p1``: the draft's distribution at position 1; ``top2``: its top probability at position 2
    given the greedy ``x_1``. An ambiguous first position (a runner-up more likely than the whole
    greedy two-token path) is worth a sequence of its own."""
    top = p1.topk(min(max_seqs, p1.shape[-1])).values
    theta = float(top[0]) * top2
    k = 1
    for v in top[1:].tolist():
        if v <= theta:
            break
        k += 1
    return k


@dataclass
class Drafts:
    seqs: list[list[int]]
    snaps: list[list[tuple[torch.Tensor, torch.Tensor]]]  # KV of seqs[j][:-1], positions base..
    base: int


@torch.no_grad()
def draft_sequences(dr: Runner, context: list[int], budget: int, max_seqs: int = 8) -> Drafts:
    """``k`` greedy draft sequences after ``context`` totalling ``budget`` tokens (module docstring).

    Leaves the draft cache at ``len(context)`` positions; ``snaps[j]`` holds the keys/values of
    ``seqs[j]`` but its last token (which the next round feeds), for :meth:`Runner.restore`."""
    logits = dr.feed(context)[-1]
    base = len(context)
    p1 = torch.softmax(logits.double(), -1)
    x1 = int(p1.argmax())
    if budget == 1:
        return Drafts([[x1]], [dr.snapshot(base, base)], base)
    logits2 = dr.forward([x1])[-1]
    p2 = torch.softmax(logits2.double(), -1)
    k = snap_k(num_sequences(p1, float(p2.max()), max_seqs), budget, max_seqs)
    length = budget // k
    firsts = [x1] + p1.topk(k).indices[1:].tolist()
    seqs, snaps = [], []
    for j, first in enumerate(firsts):
        s = [first]
        if j == 0 and length >= 2:
            s.append(int(p2.argmax()))  # x_2 was drafted for theta already
        elif j > 0:
            dr.rollback(base)
        while len(s) < length:
            s.append(int(dr.forward([s[-1]])[-1].argmax()))
        seqs.append(s)
        snaps.append(dr.snapshot(base, base + length - 1))
    dr.rollback(base)
    return Drafts(seqs, snaps, base)


@torch.no_grad()
def duo_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompt: list[int],
    *,
    max_new_tokens: int,
    gamma: int = 16,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    clock: AnyClock | None = None,
    max_seqs: int = 8,
    first_budget: int = 1,
    parallel: bool = True,
    on_round: Callable[[list[int], list[int], Runner, Runner], None] | None = None,
) -> GenResult:
    """DuoDecoding of ``prompt`` (token ids, batch size 1); see the module docstring.

    ``parallel=False`` runs the draft after the target in the same thread (same tokens; for
    debugging and for measuring what the overlap buys). ``on_round(seq, tail, target_runner,
    draft_runner)`` is called after every round (for tests).

    Raises:
        DraftError: the draft failed (the target, whose cache lives in this call only, stays usable).
    """
    if gamma < 1 or first_budget < 1:
        raise ValueError(f"gamma and first_budget must be >= 1, got {gamma} and {first_budget}")
    tr, dr = Runner(target, "target", clock), Runner(draft, "draft", clock)
    stats = GenStats("duo", gamma=gamma)
    seq: list[int] = list(prompt)
    tail: list[int] = []
    new: list[int] = []
    budget = first_budget
    pool = ThreadPoolExecutor(1, thread_name_prefix="leantune-draft") if parallel else None
    t0 = time.perf_counter()
    try:
        while not done(new, max_new_tokens, eos_id):
            context = seq + tail
            fut = pool.submit(draft_sequences, dr, context, budget, max_seqs) if pool is not None else None
            p_rows = processed_probs(tr.feed(context)[-(len(tail) + 1) :], sampling)
            try:
                drafts = fut.result() if fut is not None else draft_sequences(dr, context, budget, max_seqs)
            except Exception as err:
                raise DraftError(f"the draft model failed: {type(err).__name__}: {err}") from err
            if clock is not None:
                clock.sync()  # the round ends when the slower of the two lanes does
            stats.k_hist[len(drafts.seqs)] = stats.k_hist.get(len(drafts.seqs), 0) + 1
            n, tok = verify_tokens(p_rows[: len(tail)], None, tail, sampling, generator)
            stats.drafted += len(tail)
            stats.accepted += n
            if tok is not None:  # tail rejected at n: drafts assumed it, so they are discarded
                committed = tail[:n] + [tok]
                valid = len(seq) + n
                tr.rollback(valid)
                dr.rollback(valid)
                tail = []
            else:
                t, j = choose_sequence(p_rows[-1], [s[0] for s in drafts.seqs], sampling, generator)
                committed = tail + [t]
                stats.first_checks += 1
                stats.drafted += 1
                if j is not None:
                    stats.first_hits += 1
                    stats.accepted += 1
                    dr.restore(drafts.base, drafts.snaps[j])
                    tail = drafts.seqs[j][1:]
                else:
                    dr.rollback(drafts.base)
                    tail = []
            seq += committed
            new += committed
            stats.rounds += 1
            stats.accept_lengths.append(len(committed))
            if stats.ttft_s is None:
                stats.ttft_s = time.perf_counter() - t0
                stats.virtual_ttft_s = clock.now if clock is not None else None
            budget = gamma
            if on_round is not None:
                on_round(seq, tail, tr, dr)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    stats.target_forwards, stats.draft_forwards = tr.forwards, dr.forwards
    stats.wall_s = time.perf_counter() - t0
    out = finish(new, max_new_tokens, eos_id)
    stats.new_tokens = len(out)
    if clock is not None:
        stats.virtual_s = clock.now
    return GenResult(out, stats)
