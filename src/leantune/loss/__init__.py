"""Losses that never hold a model's full logits: :func:`linear_cross_entropy` (the head projection
and the cross-entropy over chunks of tokens) and :class:`ChunkedLMLoss`, which computes a Hugging Face
causal LM's training loss with it."""

from leantune.loss.causal_lm import ChunkedLMLoss, StandardLMLoss, UnsupportedHeadError, training_loss
from leantune.loss.linear_ce import DEFAULT_CHUNK, linear_cross_entropy, workspace_bytes

__all__ = [
    "ChunkedLMLoss",
    "StandardLMLoss",
    "UnsupportedHeadError",
    "training_loss",
    "linear_cross_entropy",
    "workspace_bytes",
    "DEFAULT_CHUNK",
]
