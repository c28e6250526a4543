"""Generation under a :class:`~leantune.kvcache.policy.KVPolicy`: the cache, the hook, the prefill.

One prompt at a time (a ``(1, n)`` tensor, no padding): evicting policies keep a different token set
per head and LongCache a different selection per block, which a shared padding mask cannot follow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from leantune.kvcache.cache import attach, make_cache
from leantune.kvcache.policy import KVPolicy

__all__ = ["greedy_continue", "kv_generate", "kv_session"]


@contextlib.contextmanager
def kv_session(model: torch.nn.Module, policy: KVPolicy) -> Iterator[Any]:
    """The cache to pass as ``cache=`` to ``model`` / ``model.generate`` inside the block.

    ``None`` for ``full`` (the model makes its own). For ``longcache`` the prompt must be fed with
    :func:`leantune.kvcache.longcache.prefill` (blocks that fit the local window).
    """
    if policy.policy == "longcache":
        from transformers import DynamicCache

        from leantune.kvcache.longcache import LongCacheHook

        hook = LongCacheHook(model, policy.longcache, policy.train_length)
        with attach(model, None, hook):
            yield DynamicCache()
        return
    cache = make_cache(policy, model)
    with attach(model, cache):
        yield cache


def _check_prompt(input_ids: torch.Tensor, policy: KVPolicy) -> int:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"--kv-policy {policy.policy} generates one prompt at a time, got {tuple(input_ids.shape)}"
        )
    n = input_ids.shape[1]
    policy.resolve(n)  # a fractional budget is checked against sink + recent here, before any forward
    return n


@torch.no_grad()
def kv_generate(
    model: torch.nn.Module, input_ids: torch.Tensor, policy: KVPolicy, **generate_kwargs
) -> torch.Tensor:
    """``model.generate`` for one prompt ``(1, n)`` under ``policy``; returns prompt + new ids."""
    _check_prompt(input_ids, policy)
    mask = torch.ones_like(input_ids)
    with kv_session(model, policy) as cache:
        if policy.policy == "longcache" and input_ids.shape[1] > 1:
            from leantune.kvcache.longcache import prefill

            prefill(model, input_ids[:, :-1], cache, policy.longcache)  # generate feeds the last token
        return model.generate(input_ids=input_ids, attention_mask=mask, cache=cache, **generate_kwargs)


@torch.no_grad()
def greedy_continue(
    model: torch.nn.Module,
    ids: list[int],
    max_new_tokens: int,
    eos_id: int | None,
    policy: KVPolicy,
    on_prefill: Callable[[Any], None] | None = None,
    forced: Sequence[int] = (),
) -> list[int]:
    """Greedy continuation of ``ids`` under ``policy``, stopping at eos; the new token ids.

    ``on_prefill(cache)`` is called once the prompt is in the cache, before the first decoded
    token (e.g. to measure what the policy kept of the prompt). ``forced`` tokens are fed one at a
    time through the cache after the prefill, as decoding would feed them, before the first token is
    chosen: e.g. a question asked after the policy has evicted (they are not in the output)."""
    from leantune.kvcache.longcache import prefill

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    _check_prompt(x, policy)
    new: list[int] = []
    with kv_session(model, policy) as cache:
        if policy.policy == "longcache":
            out = prefill(model, x, cache, policy.longcache)
        else:
            out = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
        if on_prefill is not None:
            on_prefill(cache)
        for tok in forced:
            out = model(input_ids=torch.tensor([[int(tok)]], device=device), cache=cache, use_cache=True)
        for step in range(max_new_tokens):
            tok = int(out.logits[0, -1].argmax())
            if eos_id is not None and tok == eos_id:
                break
            new.append(tok)
            if step + 1 < max_new_tokens:
                out = model(input_ids=torch.tensor([[tok]], device=device), cache=cache, use_cache=True)
    return new
