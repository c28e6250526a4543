r"""Which prompt tokens each KV head keeps: proxy attention scores and the per-policy selections.

Pure tensor functions, separate from the cache that applies them, so that they can be checked
against plain loops. Shapes: ``B`` batch, ``H`` query heads, ``G`` KV heads (``H = G * group``),
``n`` prompt length, ``D`` head dim, ``P`` proxy queries.

NACL's score of key :math:`j` for KV head :math:`g` is the attention the proxies pay it,

.. math::
    s_g[j] = \frac{1}{|g|} \sum_{h \in g} \sum_{i \in \text{proxy}} \operatorname{softmax}_j
    \Big(\frac{q_{h,i} \cdot k_{g,j}}{\sqrt{D}} + m_{ij}\Big),

with :math:`m` the causal mask. Note: NACL's code masks nothing (it subtracts the flash-attention
log-sum-exp from all :math:`q \cdot k`), which matters only for keys after a proxy; with
``recent >= proxies`` those keys are kept anyway. The mean over the query heads of a KV group is
our reading of "aggregate over the group" (the reference code is ambiguous); a mean rather than a
sum keeps :math:`s \in [0, P]`, so the softmax that draws the random part has NACL's temperature
whatever the group size.
"""

from __future__ import annotations

import torch

from leantune.kvcache.policy import Budget

__all__ = ["proxy_scores", "select_indices", "gumbel_noise"]


def proxy_scores(query_tail: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """NACL scores ``(B, G, n)`` from the last ``P`` queries ``(B, H, P, D)`` and all keys ``(B, G, n, D)``.

    The queries are the last ``P`` positions of the ``n``-token prompt (they attend causally); the
    work is ``O(H * P * n * D)`` and no ``n x n`` matrix is built.
    """
    b, h, p, d = query_tail.shape
    g, n = keys.shape[1], keys.shape[2]
    if h % g:
        raise ValueError(f"{h} query heads do not split into {g} KV groups")
    q = query_tail.float().view(b, g, h // g, p, d)
    logits = torch.einsum("bgrpd,bgnd->bgrpn", q, keys.float()) * scaling
    # Proxy i sits at position n - p + i and sees keys j <= n - p + i.
    future = (
        torch.arange(n, device=keys.device)[None, :] > (n - p + torch.arange(p, device=keys.device))[:, None]
    )
    logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1).sum(dim=3).mean(dim=2)


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """Standard Gumbel noise; ``topk(log_weights + noise, k)`` draws ``k`` indices without replacement
    with probability proportional to the weights (the Gumbel-top-k trick, Kool et al. 2019), which is
    ``numpy.random.choice(p=softmax(score), replace=False)`` when the log weights are the scores."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - torch.finfo(torch.float64).eps)
    return (-torch.log(-torch.log(u))).to(device=device, dtype=torch.float32)


def select_indices(
    budget: Budget,
    n: int,
    *,
    scores: torch.Tensor | None = None,
    shape: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the kept prompt tokens, ``(B, G, budget.total)`` int64, sorted within each head.

    Sink ``[0, sink)`` and recent ``[n - recent, n)`` are always kept. From the middle
    ``[sink, n - recent)`` the ``budget.scored`` highest-scoring tokens are taken, then
    ``budget.sampled`` of the rest are drawn without replacement: with probability
    ``softmax(score)`` when ``scores`` are given, uniformly when not.

    Args:
        budget: per-part counts (see :meth:`leantune.kvcache.policy.KVPolicy.resolve`).
        n: prompt length.
        scores: ``(B, G, n)`` proxy scores; needed when ``budget.scored > 0``.
        shape: ``(B, G)`` when there are no scores.
        generator: source of the random draws; needed when ``budget.sampled > 0``.
    """
    lo, hi = budget.sink, n - budget.recent
    if budget.total > n or hi - lo < budget.scored + budget.sampled:
        raise ValueError(f"a budget of {budget.total} does not fit a {n}-token prompt as {budget}")
    if scores is not None:
        b, g = scores.shape[:2]
        device = scores.device
    elif shape is not None and budget.scored == 0:
        (b, g), device = shape, (generator.device if generator is not None else torch.device("cpu"))
    else:
        raise ValueError("scores are needed to keep tokens by score")
    parts = [torch.arange(lo, device=device).expand(b, g, lo)]
    if budget.scored or budget.sampled:
        mid = scores[..., lo:hi].float() if scores is not None else torch.zeros(b, g, hi - lo, device=device)
        if budget.scored:
            top = mid.topk(budget.scored, dim=-1).indices
            parts.append(top + lo)
            mid = mid.scatter(-1, top, float("-inf"))  # taken: never drawn again
        if budget.sampled:
            if generator is None:
                raise ValueError("a generator is needed to draw the random part")
            keys = mid + gumbel_noise(mid.shape, generator, device)
            parts.append(keys.topk(budget.sampled, dim=-1).indices + lo)
    parts.append(torch.arange(hi, n, device=device).expand(b, g, n - hi))
    return torch.cat(parts, dim=-1).sort(dim=-1).values
