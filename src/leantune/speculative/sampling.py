"""The math of lossless speculative decoding, on plain probability vectors (no model here).

Notation: ``p`` is the target's and ``q`` the draft's next-token distribution, both *processed*
(temperature, top-k and top-p applied the same way to both, :func:`processed_probs`), since the
tokens that are finally emitted must follow the processed target distribution.

Acceptance (Leviathan et al. 2023, Alg. 1; Chen et al. 2023): a draft token ``x ~ q`` is kept with
probability ``min(1, p(x) / q(x))``; on rejection the token is drawn from the residual
``r = norm(max(0, p - q))``. The emitted token then has exactly the law ``p``:

    P(out = x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) r(x)
               = min(p(x), q(x)) + max(0, p(x) - q(x))                          = p(x),

because ``sum_y max(0, p(y) - q(y)) = 1 - sum_y min(p(y), q(y))``. (:func:`output_distribution`
computes the left-hand side, the tests check it against ``p``.)

A greedy draft (DuoDecoding drafts greedily) has a one-hot ``q``: keep ``x`` with probability
``p(x)``, and on rejection draw from ``p`` with ``x`` removed and renormalised.

Under greedy decoding ``p`` and ``q`` are one-hot at their argmax: accept while ``x == argmax p``,
else emit ``argmax p``; the output is the target's greedy output token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "GREEDY",
    "Sampling",
    "accept_or_resample",
    "choose_sequence",
    "output_distribution",
    "processed_probs",
    "residual",
    "sample_token",
    "verify_tokens",
]


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy (``do_sample=False``) or sampled from the processed distribution."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


GREEDY = Sampling()


def processed_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next-token probabilities (float64, last dimension) after temperature, top-k and top-p.

    Greedy: one-hot at the argmax. Top-p keeps the smallest set of most likely tokens whose mass
    reaches ``top_p`` (the token that crosses it included, as transformers' ``TopPLogitsWarper``).
    """
    logits = logits.detach().to(torch.float64)
    if not sampling.do_sample:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= sampling.top_p  # the first token is never dropped (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))``; ``p`` itself where ``p <= q`` everywhere (then ``p == q`` and a
    rejection has probability 0, so the value never matters for the output law)."""
    r = (p - q).clamp_min(0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-300), p)


def output_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The exact law of the token emitted by one accept-or-resample step (see the module docstring):
    ``q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) residual(x)``; equals ``p``."""
    ratio = torch.where(q > 0, p / q.clamp_min(1e-300), torch.zeros_like(p)).clamp(max=1.0)
    reject = 1.0 - torch.minimum(p, q).sum(-1, keepdim=True)
    return q * ratio + reject * residual(p, q)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.to(torch.float64), 1, generator=generator))


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), dtype=torch.float64, generator=generator))


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, x: int, sampling: Sampling, generator: torch.Generator | None = None
) -> tuple[bool, int]:
    """One verification step for draft token ``x ~ q``: ``(True, x)`` if kept, else
    ``(False, token drawn from residual(p, q))``. Greedy: kept iff ``x == argmax p``."""
    if not sampling.do_sample:
        best = int(p.argmax())
        return best == x, best
    px, qx = float(p[x]), float(q[x])
    if qx > 0 and _uniform(generator) < min(1.0, px / qx):
        return True, x
    return False, _draw(residual(p, q), generator)


def verify_tokens(
    p_rows: torch.Tensor,
    q_rows: torch.Tensor | None,
    tokens: list[int],
    sampling: Sampling,
    generator: torch.Generator | None = None,
) -> tuple[int, int | None]:
    """Verify draft ``tokens`` left to right against the target rows ``p_rows[i]`` (the target's
    distribution for ``tokens[i]``).

    ``q_rows[i]`` is the law ``tokens[i]`` was drawn from; ``None`` means greedy drafts (one-hot
    ``q``). Returns ``(n_accepted, token)``: ``token`` is the residual draw at the first rejection,
    or ``None`` when all were accepted (the caller then draws the bonus token from the next row).
    """
    for i, x in enumerate(tokens):
        p = p_rows[i]
        if q_rows is None:
            q = torch.zeros_like(p)
            q[x] = 1.0
        else:
            q = q_rows[i]
        ok, tok = accept_or_resample(p, q, x, sampling, generator)
        if not ok:
            return i, tok
    return len(tokens), None


def choose_sequence(
    p_next: torch.Tensor,
    first_tokens: list[int],
    sampling: Sampling,
    generator: torch.Generator | None = None,
) -> tuple[int, int | None]:
    """DuoDecoding's first-token check, made lossless: draw ``t ~ p_next`` (greedy: ``argmax``) and
    pick the first draft sequence that starts with ``t``. Returns ``(t, index or None)``.

    Exact by construction: the committed token *is* ``t``, drawn from the target; the drafts only
    decide which continuation gets verified next round. (The released code accepts sequence 1 with
    probability ``p(x_1)`` and otherwise takes ``argmax p``, which is exact only under greedy.)
    """
    t = _draw(p_next, generator) if sampling.do_sample else int(p_next.argmax())
    for j, first in enumerate(first_tokens):
        if first == t:
            return t, j
    return t, None


def sample_token(probs: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """A token from processed ``probs``: the argmax when greedy, a draw otherwise."""
    return _draw(probs, generator) if sampling.do_sample else int(probs.argmax())
