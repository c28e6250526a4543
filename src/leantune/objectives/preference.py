r"""Preference losses (DPO, IPO, SimPO, ORPO) on per-sequence log-probabilities, and those
log-probabilities computed without ever holding a model's full logits.

For a pair of completions of one prompt, chosen :math:`c` and rejected :math:`r`, with summed
completion log-probs :math:`\pi_c, \pi_r` under the policy, :math:`\rho_c, \rho_r` under the
reference, lengths :math:`n_c, n_r` and averages :math:`\bar\pi = \pi / n`:

* **DPO** (Rafailov et al. 2023; TRL ``loss_type="sigmoid"``):
  :math:`h = \beta[(\pi_c - \pi_r) - (\rho_c - \rho_r)]`,
  :math:`\ell = -(1-\epsilon)\log\sigma(h) - \epsilon\log\sigma(-h)` (:math:`\epsilon`: label
  smoothing, the conservative DPO of Mitchell 2023); rewards :math:`\beta(\pi - \rho)`.
* **IPO** (Azar et al. 2023; TRL ``loss_type="ipo"``, on length-averaged log-probs):
  :math:`h = (\bar\pi_c - \bar\pi_r) - (\bar\rho_c - \bar\rho_r)`,
  :math:`\ell = (h - \tfrac{1}{2\beta})^2`; rewards :math:`\beta(\bar\pi - \bar\rho)`.
* **SimPO** (Meng et al. 2024; reference-free): :math:`h = \beta(\bar\pi_c - \bar\pi_r) - \gamma`,
  :math:`\ell = -(1-\epsilon)\log\sigma(h) - \epsilon\log\sigma(-h)`; rewards :math:`\beta\bar\pi`.
* **ORPO** (Hong et al. 2024; reference-free): with
  :math:`\mathrm{odds}(\bar\pi) = \bar\pi - \log(1 - e^{\bar\pi})`,
  :math:`\ell = -\bar\pi_c - \lambda\log\sigma(\mathrm{odds}(\bar\pi_c) - \mathrm{odds}(\bar\pi_r))`
  (the chosen completion's mean nll plus the odds-ratio term; TRL's ORPO calls :math:`\lambda`
  ``beta``); rewards :math:`\lambda\bar\pi`.

Each function returns per-pair values; a trainer averages the loss over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantune.loss import ChunkedLMLoss

__all__ = [
    "LOSSES",
    "NEEDS_REFERENCE",
    "PreferenceOutput",
    "completion_logps",
    "preference_loss",
]

LOSSES = ("dpo", "ipo", "simpo", "orpo")
NEEDS_REFERENCE = {"dpo": True, "ipo": True, "simpo": False, "orpo": False}
_AVERAGED = {"dpo": False, "ipo": True, "simpo": True, "orpo": True}


@dataclass(frozen=True)
class PreferenceOutput:
    """Per-pair results of :func:`preference_loss` (all shaped like the inputs)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def margins(self) -> Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> Tensor:
        """1 where the implicit reward prefers the chosen completion, else 0 (float)."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def _check(name: str, value: float, low: float, high: float = math.inf, *, closed_low: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not ((low <= value if closed_low else low < value) and value < high):
        bound = f"[{low}, {high})" if closed_low else f"({low}, {high})"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")


def preference_loss(
    kind: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    orpo_lambda: float = 0.1,
) -> PreferenceOutput:
    """One of :data:`LOSSES` per pair (the module docstring has the formulas).

    Args:
        kind: ``dpo``, ``ipo``, ``simpo`` or ``orpo``.
        chosen_logps, rejected_logps: the policy's summed completion log-probs, one per pair.
        ref_chosen_logps, ref_rejected_logps: the reference's (``dpo`` and ``ipo`` only).
        chosen_tokens, rejected_tokens: completion lengths; required by the length-averaged
            losses (``ipo``, ``simpo``, ``orpo``).
        beta: the KL coefficient (DPO, IPO) or reward scale (SimPO).
        label_smoothing: probability that a label is flipped (DPO, SimPO), in [0, 0.5).
        gamma: SimPO's target margin.
        orpo_lambda: ORPO's weight of the odds-ratio term.

    Raises:
        ValueError: an unknown kind, a bad hyperparameter, a missing reference or length, or
            inputs of different shapes.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}: choose from {', '.join(LOSSES)}")
    _check("beta", beta, 0.0)
    _check("label_smoothing", label_smoothing, 0.0, 0.5, closed_low=True)
    _check("gamma", gamma, -math.inf)
    _check("orpo_lambda", orpo_lambda, 0.0, closed_low=True)
    pc, pr = chosen_logps, rejected_logps
    tensors = {"chosen_logps": pc, "rejected_logps": pr}
    if NEEDS_REFERENCE[kind]:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"{kind} needs the reference's log-probs (ref_chosen_logps, ref_rejected_logps)")
        rc, rr = ref_chosen_logps.to(pc.dtype), ref_rejected_logps.to(pc.dtype)
        tensors |= {"ref_chosen_logps": rc, "ref_rejected_logps": rr}
    if _AVERAGED[kind]:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"{kind} averages over the completion: give chosen_tokens and rejected_tokens")
        nc, nr = chosen_tokens.to(pc.dtype), rejected_tokens.to(pc.dtype)
        if bool((nc <= 0).any()) or bool((nr <= 0).any()):
            raise ValueError(f"{kind}: a completion has no tokens (its length is 0)")
        tensors |= {"chosen_tokens": nc, "rejected_tokens": nr}
        pc, pr = pc / nc, pr / nr
        if NEEDS_REFERENCE[kind]:
            rc, rr = rc / nc, rr / nr
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the inputs' shapes differ: {shapes}")

    def smoothed(h: Tensor) -> Tensor:
        return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)

    if kind == "dpo":
        loss = smoothed(beta * ((pc - pr) - (rc - rr)))
        return PreferenceOutput(loss, beta * (pc - rc).detach(), beta * (pr - rr).detach())
    if kind == "ipo":
        loss = ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2
        return PreferenceOutput(loss, beta * (pc - rc).detach(), beta * (pr - rr).detach())
    if kind == "simpo":
        loss = smoothed(beta * (pc - pr) - gamma)
        return PreferenceOutput(loss, beta * pc.detach(), beta * pr.detach())

    # ORPO. log(1 - e^x) for x < 0, accurately near 0 (a completion the model is sure of).
    def log1mexp(x: Tensor) -> Tensor:
        return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

    log_odds = (pc - log1mexp(pc)) - (pr - log1mexp(pr))
    loss = -pc - orpo_lambda * F.logsigmoid(log_odds)
    return PreferenceOutput(loss, orpo_lambda * pc.detach(), orpo_lambda * pr.detach())


def completion_logps(
    model: nn.Module, batch: Mapping[str, Tensor], loss: ChunkedLMLoss | None = None
) -> tuple[Tensor, Tensor]:
    """Each sequence's summed log-prob of its target tokens (``labels != -100``, shifted by one as
    in training) and how many there are: ``(logps (B,), tokens (B,))``, with gradients.

    ``loss``: a :class:`~leantune.loss.ChunkedLMLoss` of ``model`` (what the trainer uses for
    ``train.loss_chunk > 0``): the full logits never exist, and each sequence's weight in the
    gradient reaches the head's chunked backward. ``None``: through the model's full logits.
    """
    if loss is not None:
        nll, mask = loss.token_nll(model, batch)
        return -nll.sum(dim=1), mask.sum(dim=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1), mask.sum(dim=1)
