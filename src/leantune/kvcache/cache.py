"""An evicting KV cache over transformers' Cache API, and the attention hook that feeds it.

How it plugs in (no copy of any model's attention):

* :class:`EvictingCache` is a :class:`transformers.Cache` of :class:`EvictingLayer`, a
  ``DynamicLayer`` that, at prefill, keeps the full keys for that forward's attention (so the prompt
  states are exact, as in NACL) and marks itself for eviction.
* The scores need the proxies' *queries*, which a cache never sees. :func:`attach` switches the
  model to a registered attention function (transformers' ``AttentionInterface``) that calls the
  model's own ``sdpa`` / ``eager`` attention unchanged and then hands the post-RoPE query it was
  given to the layer, which scores its keys and evicts. This is exact (the very queries the model
  used, rotary embedding and any q-norm included), family-agnostic (every model that dispatches
  through ``ALL_ATTENTION_FUNCTIONS``) and cheap (``P`` query rows against ``n`` keys). A forward
  hook recomputing the queries from the hidden states would instead copy each family's q
  projection, norm and rotation.

Positions continue from the prompt length: :meth:`EvictingLayer.get_seq_length` reports tokens
*seen*, which the model and ``generate`` use for the next position ids, while the mask is sized by
the tokens *kept* (:meth:`EvictingLayer.get_mask_sizes`). Kept keys keep the rotation of their
original positions, as in NACL. One prompt per batch row, without padding: each head of each row
keeps its own token set, which a padding mask over original positions cannot describe.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from leantune.kvcache.policy import Budget, KVPolicy
from leantune.kvcache.select import proxy_scores, select_indices

__all__ = ["EvictingCache", "EvictingLayer", "attach", "cache_nbytes", "make_cache"]

_ATTN_PREFIX = "leantune_kv_"
_BASES = ("sdpa", "eager")
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("leantune_kv_cache", default=None)


class EvictingLayer(DynamicLayer):
    """A ``DynamicLayer`` that evicts its prompt to a :class:`KVPolicy` budget, once, at prefill.

    After eviction ``keys`` / ``values`` are ``(B, G, budget + decoded, D)``; ``kept`` holds the
    original positions of the prompt tokens kept, ``(B, G, budget)``.
    """

    is_croppable = False

    def __init__(self, policy: KVPolicy, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.generator = generator
        self.seen = 0
        self.pending: Budget | None = None
        self.kept: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending is not None:
            raise RuntimeError(
                "the KV cache was not evicted after prefill: run the model inside "
                "leantune.kvcache.attach(model, cache)"
            )
        prefill = not self.is_initialized
        keys, values = super().update(key_states, value_states)
        self.seen += key_states.shape[-2]
        if prefill:
            self.pending = self.policy.resolve(self.seen)
        return keys, values

    def evict(self, query: torch.Tensor, scaling: float) -> None:
        """Apply the pending eviction; ``query`` is the prefill's post-RoPE query ``(B, H, n, D)``."""
        budget, self.pending = self.pending, None
        if budget is None:
            return
        n = self.keys.shape[-2]
        scores = None
        if budget.scored or (budget.sampled and self.policy.policy == "nacl"):
            p = min(self.policy.proxies, n)
            scores = proxy_scores(query[:, :, -p:], self.keys, scaling)
        idx = select_indices(
            budget, n, scores=scores, shape=tuple(self.keys.shape[:2]), generator=self.generator
        )
        gather = idx.unsqueeze(-1).expand(*idx.shape, self.keys.shape[-1])
        # New tensors, not views: the full prompt's keys and values are freed here, layer by layer.
        self.keys = self.keys.gather(2, gather).contiguous()
        self.values = self.values.gather(2, gather).contiguous()
        self.kept = idx

    def get_seq_length(self) -> int:
        """Tokens seen (prompt + decoded): the next token's position."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.keys.shape[-2] if self.is_initialized and self.keys.numel() else 0
        return kept + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen, self.pending, self.kept = 0, None, None


class EvictingCache(Cache):
    """One :class:`EvictingLayer` per model layer, created as the layers are reached.

    Args:
        policy: an evicting :class:`KVPolicy` (``nacl``, ``streaming`` or ``random``).
        device: where the random draws are made (the model's device).
    """

    def __init__(self, policy: KVPolicy, device: torch.device | str = "cpu") -> None:
        if not policy.evicts:
            raise ValueError(f"EvictingCache needs an evicting policy, got --kv-policy {policy.policy}")
        self.policy = policy
        # One generator for the whole cache, consumed layer after layer in order: a seed fixes the
        # draws of every layer and head.
        self.generator = torch.Generator(device=device).manual_seed(policy.seed)
        super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> EvictingLayer:
        return EvictingLayer(self.policy, self.generator)


def make_cache(policy: KVPolicy, model: torch.nn.Module) -> Cache | None:
    """The cache a policy generates with: ``None`` (transformers' default) for ``full``."""
    if policy.policy == "full":
        return None
    if policy.evicts:
        return EvictingCache(policy, device=next(model.parameters()).device)
    raise ValueError(f"--kv-policy {policy.policy} has no evicting cache (see leantune.kvcache.longcache)")


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the keys and values of ``cache``."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# the attention hook


def _base_attention(module: torch.nn.Module, base: str):
    if base == "eager":  # each family defines its own eager attention next to its attention module
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_attention(base: str):
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        fn = _base_attention(module, base)
        hook = _ACTIVE.get()
        if hook is None:  # the model is used outside attach(): plain attention
            return fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return hook(fn, module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    attention.__name__ = f"{_ATTN_PREFIX}{base}"
    return attention


def _register() -> None:
    for base in _BASES:
        name = f"{_ATTN_PREFIX}{base}"
        if name not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(name, _make_attention(base))
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


class _EvictionHook:
    """Plain attention on the full keys, then the layer's pending eviction with that query."""

    def __init__(self, cache: EvictingCache) -> None:
        self.cache = cache

    def __call__(self, fn, module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        layer = self.cache.layers[module.layer_idx]
        if layer.pending is not None:
            layer.evict(query, scaling if scaling is not None else module.scaling)
        return out


@contextlib.contextmanager
def attach(model: torch.nn.Module, cache: Cache | None, hook: Any = None) -> Iterator[Cache | None]:
    """Run ``model`` with ``cache`` inside the block: its attention goes through leantune's hook.

    ``hook(fn, module, query, key, value, attention_mask, scaling=..., **kwargs)`` replaces the
    attention call (``fn`` is the model's own); by default it is the eviction of an
    :class:`EvictingCache`. A ``full`` policy (``cache is None``, no hook) changes nothing. The
    model's attention implementation (``sdpa`` or ``eager``) is restored on exit.

    Raises:
        ValueError: the model uses another attention implementation (e.g. flash attention).
    """
    if cache is None and hook is None:
        yield cache
        return
    config = model.config
    base = config._attn_implementation
    if base not in _BASES:
        raise ValueError(f"KV-cache policies run on sdpa or eager attention, not {base!r}")
    _register()
    token = _ACTIVE.set(hook if hook is not None else _EvictionHook(cache))
    config._attn_implementation = f"{_ATTN_PREFIX}{base}"
    try:
        yield cache
    finally:
        config._attn_implementation = base
        _ACTIVE.reset(token)
