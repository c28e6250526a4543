"""KV-cache policies for long prompts in little memory: NACL eviction and LongCache.

* :mod:`~leantune.kvcache.policy` - the ``--kv-*`` options, validated (pure Python, imported eagerly);
* :mod:`~leantune.kvcache.select` - proxy scores and the per-policy token selections;
* :mod:`~leantune.kvcache.cache` - the evicting cache layer and the attention hook;
* :mod:`~leantune.kvcache.longcache` - LongCache (ReAttention) attention beyond the training length;
* :mod:`~leantune.kvcache.generation` - generation and greedy decoding under a policy.

The torch-side modules are imported on first use, so option parsing stays fast. See docs/kv-cache.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from leantune.kvcache.policy import EVICTION_POLICIES, POLICIES, Budget, KVPolicy, parse_budget

_LAZY = {
    "EvictingCache": "cache",
    "EvictingLayer": "cache",
    "attach": "cache",
    "cache_nbytes": "cache",
    "make_cache": "cache",
    "LongCacheConfig": "longcache",
    "LongCacheHook": "longcache",
    "prefill": "longcache",
    "greedy_continue": "generation",
    "kv_generate": "generation",
    "kv_session": "generation",
    "proxy_scores": "select",
    "select_indices": "select",
}

__all__ = ["EVICTION_POLICIES", "POLICIES", "Budget", "KVPolicy", "parse_budget", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"leantune.kvcache.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
