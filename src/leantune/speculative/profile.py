"""Hardware-aware drafting budget: profile both models at start-up, pick ``gamma*``.

DuoDecoding overlaps drafting with verification, so a round lasts
``max(gamma * t_draft, T_verify)``: a budget below ``T_verify / t_draft`` leaves the draft idle
(fewer tokens proposed for the same round time), one above it makes the target wait. The budget
that minimises idle time is therefore

    gamma* = max(1, floor(T_verify / t_draft)),

with ``t_draft`` the draft's time per drafted token (one single-token forward with the KV cache)
and ``T_verify`` the target's time for one verification forward (``gamma + 1`` tokens with the KV
cache). The reference spec gives this formula as a proposal (the paper's is not public). Because
``T_verify`` depends on ``gamma`` a little, it is measured at the current guess and the guess
updated, a few times (a fixed-point iteration from ``gamma = 8``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from leantune.speculative.common import Runner

__all__ = ["Profile", "gamma_star", "profile_models"]


def gamma_star(t_verify: float, t_draft: float, max_gamma: int = 64) -> int:
    """``max(1, floor(T_verify / t_draft))``, capped at ``max_gamma``."""
    if t_draft <= 0:
        return max_gamma
    return int(max(1, min(max_gamma, t_verify // t_draft)))


@dataclass(frozen=True)
class Profile:
    t_draft: float  # seconds per drafted token
    t_verify: float  # seconds per verification forward (gamma + 1 tokens)
    t_target_token: float  # seconds per single-token target forward (plain decoding's step)
    gamma: int  # gamma* for these figures

    def describe(self) -> str:
        return (
            f"draft {self.t_draft * 1e3:.2f} ms/token, target verification {self.t_verify * 1e3:.2f} ms "
            f"(single token {self.t_target_token * 1e3:.2f} ms): gamma* = {self.gamma}"
        )


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def profile_models(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    *,
    context: int = 32,
    repeats: int = 5,
    iterations: int = 3,
    max_gamma: int = 64,
    vocab: int | None = None,
) -> Profile:
    """Measure ``t_draft`` and ``T_verify`` with a few warm forwards on a ``context``-token
    random prefix (cached), and return the resulting :class:`Profile`."""
    vocab = vocab or int(target.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (context + max_gamma + 2,), generator=g).tolist()
    tr, dr = Runner(target, "target"), Runner(draft, "draft")
    tr.forward(ids[:context])
    dr.forward(ids[:context])

    def step(r: Runner, n: int) -> None:
        r.forward(ids[context : context + n])
        r.rollback(context)

    step(dr, 1)  # warm-up
    step(tr, 1)
    t_draft = _median_time(lambda: step(dr, 1), repeats)
    t_one = _median_time(lambda: step(tr, 1), repeats)
    gamma = 8
    t_verify = t_one
    for _ in range(iterations):
        t_verify = _median_time(lambda n=gamma + 1: step(tr, n), repeats)
        new = gamma_star(t_verify, t_draft, max_gamma)
        if new == gamma:
            break
        gamma = new
    return Profile(t_draft, t_verify, t_one, gamma_star(t_verify, t_draft, max_gamma))
