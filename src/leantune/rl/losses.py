"""PPO's losses (Schulman et al. 2017, with PPO-max's switches), per token over a response mask.

Policy (clipped surrogate), with ``rho = exp(logp - old_logp)``::

    L_pi = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

Value (clipped, the larger of the two errors, factor 1/2 as MA-RLHF and TRL)::

    V'_t = old_V_t + clip(V_t - old_V_t, -eps_v, eps_v)
    L_V  = 0.5 * mean_t max((V_t - R_t)^2, (V'_t - R_t)^2)

``eps = None`` turns a clip off (the plain surrogate / squared error).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leantune.rl.advantages import masked_mean

__all__ = ["entropy_from_logits", "policy_loss", "token_logprobs", "value_loss"]


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate loss and its diagnostics: ``clipfrac`` (the share of tokens whose
    ratio was clipped) and ``approx_kl`` (``mean((rho - 1) - log rho)``, Schulman's k3 estimator
    of KL(old || new))."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    if clip is None:
        loss = masked_mean(unclipped, mask)
        clipped_share = torch.zeros((), device=logp.device)
    else:
        clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
        loss = masked_mean(torch.maximum(unclipped, clipped), mask)
        clipped_share = masked_mean((clipped > unclipped).float(), mask)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, {"clipfrac": clipped_share.detach(), "approx_kl": approx_kl}


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """The (clipped) value loss and ``vf_clipfrac``, the share of tokens where the clipped error
    was the larger."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), {"vf_clipfrac": torch.zeros((), device=values.device)}
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask).detach()}


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[..., tokens]`` without a second vocabulary-sized tensor
    (``logit - logsumexp``)."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked.float() - torch.logsumexp(logits.float(), dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """The entropy of the categorical distribution of each row of ``logits`` (nats)."""
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = (logits - logz).exp()
    # 0 * -inf is NaN: a masked vocabulary entry (-inf logit) contributes nothing
    return logz.squeeze(-1) - torch.where(p > 0, p * logits, 0.0).sum(-1)
