"""Long-context tools: RoPE base arithmetic (scaling laws of RoPE extrapolation) and passkey retrieval.

The RoPE arithmetic is pure Python and imported eagerly; the passkey / perplexity probes need torch
and are imported on first use, so ``leantune rope`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from leantune.longctx.rope import (
    PAPER_PRETRAIN_BASE,
    RopeReport,
    base_for_target_length,
    critical_base,
    critical_dimension,
    extrapolation_bound,
    plot_periods,
    rope_params_from_hf_config,
    rope_report,
    rotary_frequencies,
    rotary_periods,
    small_base_thresholds,
)

_LAZY = {
    "PasskeyGrid": "passkey",
    "PasskeySample": "passkey",
    "PositionBucket": "passkey",
    "evaluate_passkey": "passkey",
    "make_passkey_sample": "passkey",
    "perplexity_by_position": "passkey",
    "plot_passkey_heatmap": "passkey",
    "score_answer": "passkey",
}

__all__ = [
    "PAPER_PRETRAIN_BASE",
    "RopeReport",
    "base_for_target_length",
    "critical_base",
    "critical_dimension",
    "extrapolation_bound",
    "plot_periods",
    "rope_params_from_hf_config",
    "rope_report",
    "rotary_frequencies",
    "rotary_periods",
    "small_base_thresholds",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"leantune.longctx.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
