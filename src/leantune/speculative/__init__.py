"""Speculative decoding: a small draft model proposes tokens, the target verifies them in one
forward. Standard SD (:func:`sd_generate`), DuoDecoding (:func:`duo_generate`: draft and target
run concurrently, dynamic multi-sequence drafting), the plain baseline (:func:`ar_generate`), the
hardware-aware budget (:func:`profile_models`) and a virtual clock for simulated deployments.

All are lossless: greedy output is the target's greedy output, sampled output follows the target's
processed distribution exactly (:mod:`leantune.speculative.sampling`). Batch size 1.
"""

from __future__ import annotations

from leantune.speculative.clock import Cost, VirtualClock
from leantune.speculative.common import (
    DraftError,
    GenResult,
    GenStats,
    IncompatibleDraftError,
    Runner,
    check_compatible,
)
from leantune.speculative.duo import duo_generate
from leantune.speculative.profile import Profile, gamma_star, profile_models
from leantune.speculative.sampling import Sampling
from leantune.speculative.sd import ar_generate, sd_generate

__all__ = [
    "METHODS",
    "Cost",
    "DraftError",
    "GenResult",
    "GenStats",
    "IncompatibleDraftError",
    "Profile",
    "Runner",
    "Sampling",
    "VirtualClock",
    "ar_generate",
    "check_compatible",
    "duo_generate",
    "gamma_star",
    "generate",
    "profile_models",
    "sd_generate",
]

METHODS = ("ar", "sd", "duo")


def generate(method: str, target, draft, prompt: list[int], **kwargs) -> GenResult:
    """Dispatch to :func:`ar_generate` (``draft`` ignored), :func:`sd_generate` or :func:`duo_generate`."""
    if method == "ar":
        kwargs.pop("gamma", None)
        return ar_generate(target, prompt, **kwargs)
    if method == "sd":
        return sd_generate(target, draft, prompt, **kwargs)
    if method == "duo":
        return duo_generate(target, draft, prompt, **kwargs)
    raise ValueError(f"unknown decoding {method!r}: use one of {', '.join(METHODS)}")
