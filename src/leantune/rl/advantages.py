"""Credit assignment for PPO: token rewards, macro actions (MA-RLHF), GAE, whitening, running moments.

Everything here is a pure function of tensors (or a small state object), tested against closed
forms and plain-loop references. Shapes: a batch of responses is laid out as ``[B, T]`` with a
boolean ``mask`` marking each row's response tokens, which are contiguous from column 0 (the
rollout packs them so).

Token-level rewards (PPO-max, "Secrets of RLHF Part I" §5.3; MA-RLHF §2.2)::

    r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t))          for every response token t
    r_T += score                                               the sequence reward, at the last token

GAE (Schulman et al. 2016) over a response of ``T`` steps with values ``V`` and ``V_{T} = 0``::

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}                  A_T = 0
    R_t     = A_t + V_t                                        (the value target)

Macro actions (MA-RLHF, arXiv 2410.02743): the response is cut into macro actions ``w_1..w_K``;
each gets ``V(w) = sum_i s_i V_i`` and ``R(w) = sum_i s_i r_i`` over its tokens (``mean``:
``s_i = 1/|w|``; ``position``: ``s_i`` proportional to ``1/(i+1)``; ``last``: the last token), GAE
runs over the ``K`` macro steps, and every token of ``w_k`` gets ``A(w_k)`` and ``R(w_k)``. The last
macro action is always the final token alone, which carries the sequence reward. One token per macro
action (``n = 1``) is token-level PPO exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "MACRO_ACTIONS",
    "RunningMoments",
    "aggregate",
    "gae",
    "macro_advantages",
    "macro_boundaries",
    "masked_mean",
    "masked_whiten",
    "token_advantages",
    "token_rewards",
]

MACRO_ACTIONS = ("none", "ngram", "random", "ppl")
AGGREGATIONS = ("mean", "position", "last")
RANDOM_LENGTHS = (1, 2, 3, 5, 10)  # MA-RLHF's randomized termination draws from these


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (0 where there are none)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked positions (unbiased variance, as TRL and
    MOSS-RLHF); positions outside the mask are 0. ``shift_mean=False`` keeps the mean."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def token_rewards(logp: Tensor, ref_logp: Tensor, score: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards ``[B, T]``: the KL penalty ``-kl_coef * (logp - ref_logp)`` on every
    response token and ``score[b]`` added at row ``b``'s last response token."""
    m = mask.to(logp.dtype)
    rewards = -kl_coef * (logp - ref_logp) * m
    last = mask.long().sum(1) - 1
    rows = torch.arange(len(score), device=logp.device)
    has = last >= 0
    rewards[rows[has], last[has]] += score[has].to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns of one trajectory (1-D tensors of its steps; the value after the
    last step is 0)."""
    n = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    last = rewards.new_zeros(())
    for t in range(n - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < n else rewards.new_zeros(())
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + values


def macro_boundaries(
    length: int,
    how: str = "ngram",
    *,
    n: int = 1,
    repeat: int = 3,
    rng: random.Random | None = None,
    ppl: Sequence[float] | None = None,
) -> list[int]:
    """The first token index of every macro action of a ``length``-token response (ascending,
    starting at 0). The final token is always a macro action of its own.

    Args:
        how: ``ngram``/``none``: every ``n`` tokens (``none`` is ``n = 1``); ``random``: lengths
            drawn without replacement from ``(1, 2, 3, 5, 10) * repeat`` shuffled by ``rng``, the
            remainder one macro action; ``ppl``: a new macro action wherever the perplexity
            ``ppl`` (one value per token, under the reference model) rises, so each macro action is
            a run of non-increasing perplexity.
    """
    if how == "none":
        how, n = "ngram", 1
    if how == "ngram" and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if length < 1:
        return []
    if how == "ngram":
        starts = set(range(0, length, n))
    elif how == "random":
        lengths = [k for k in RANDOM_LENGTHS for _ in range(repeat)]
        (rng or random.Random(0)).shuffle(lengths)
        starts, pos = {0}, 0
        for k in lengths:
            pos += k
            if pos >= length:
                break
            starts.add(pos)
    elif how == "ppl":
        if ppl is None or len(ppl) != length:
            raise ValueError(
                f"ppl needs one perplexity per token ({length}), got {None if ppl is None else len(ppl)}"
            )
        starts = {0} | {i + 1 for i in range(length - 1) if ppl[i + 1] > ppl[i]}
    else:
        raise ValueError(f"unknown macro action {how!r}: one of {', '.join(MACRO_ACTIONS)}")
    starts.add(length - 1)  # the last token, which carries the sequence reward, alone
    return sorted(starts)


def _weights(size: int, how: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    if how == "mean":
        return torch.full((size,), 1.0 / size, dtype=dtype, device=device)
    if how == "position":
        w = 1.0 / torch.arange(1, size + 1, dtype=dtype, device=device)
        return w / w.sum()
    if how == "last":
        w = torch.zeros(size, dtype=dtype, device=device)
        w[-1] = 1.0
        return w
    raise ValueError(f"unknown aggregation {how!r}: one of {', '.join(AGGREGATIONS)}")


def aggregate(x: Tensor, starts: Sequence[int], how: str = "mean") -> Tensor:
    """One value per macro action of the 1-D ``x``: the ``how``-weighted sum over its tokens."""
    ends = [*starts[1:], x.shape[0]]
    out = []
    for s, e in zip(starts, ends):
        if e - s == 1:
            out.append(x[s])  # a single token is itself under every weighting (bitwise)
        else:
            out.append((x[s:e] * _weights(e - s, how, x.dtype, x.device)).sum())
    return torch.stack(out)


def token_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE per token for a batch ``[B, T]``; 0 outside the mask."""
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    for b, length in enumerate(mask.long().sum(1).tolist()):
        if length:
            a, r = gae(rewards[b, :length], values[b, :length], gamma, lam)
            adv[b, :length], ret[b, :length] = a, r
    return adv, ret


def macro_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    starts: Sequence[Sequence[int]],
    gamma: float,
    lam: float,
    how: str = "mean",
) -> tuple[Tensor, Tensor]:
    """MA-RLHF's GAE over macro steps for a batch ``[B, T]``: row ``b``'s macro actions begin at
    ``starts[b]``; each token gets its macro action's advantage and return (0 outside the mask)."""
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    for b, length in enumerate(mask.long().sum(1).tolist()):
        if not length:
            continue
        s = list(starts[b])
        a, r = gae(aggregate(rewards[b, :length], s, how), aggregate(values[b, :length], s, how), gamma, lam)
        sizes = torch.tensor([e - st for st, e in zip(s, [*s[1:], length])], device=rewards.device)
        adv[b, :length] = torch.repeat_interleave(a, sizes)
        ret[b, :length] = torch.repeat_interleave(r, sizes)
    return adv, ret


class RunningMoments:
    """Running mean and standard deviation of every value seen (Chan et al.'s parallel update, as
    MOSS-RLHF and TRL keep them for reward scaling); float64 on the host, resumable."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0  # population variance of everything seen
        self.count = 0

    @property
    def std(self) -> float:
        """The sample standard deviation of everything seen (1 before two values were seen)."""
        if self.count < 2:
            return 1.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    def update(self, xs: Tensor) -> None:
        x = xs.detach().double().flatten().cpu()
        k = x.numel()
        if k == 0:
            return
        x_mean = float(x.mean())
        x_var = float(((x - x_mean) ** 2).mean())
        total = self.count + k
        delta = x_mean - self.mean
        self.var = (self.var * self.count + x_var * k + delta * delta * self.count * k / total) / total
        self.mean += delta * k / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
