"""A Hugging Face causal LM's training loss through :func:`linear_cross_entropy`.

The model's own forward runs unchanged up to its output head. The head (``get_output_embeddings()``)
gets an instance-level ``forward`` that, while :class:`ChunkedLMLoss` runs the model, keeps its input
(the final hidden states) and returns zero-width logits, so whatever the family does to its logits
afterwards (Gemma 2's softcap, Granite's scaling) costs nothing. The loss is then computed by calling
the head module itself with the targets, so that module hooks (FSDP2's unshard before forward and
before backward) see an ordinary call: a sharded head is gathered for the loss as for its matmul.

The family's post-processing of the logits is reproduced from its config (``final_logit_softcapping``,
``logits_scaling``, ``logit_scale``); :meth:`ChunkedLMLoss.check` compares the result with the
family's own loss on a probe batch, so a family that transforms its logits some other way is caught
at start-up instead of training on a wrong loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantune.loss.linear_ce import DEFAULT_CHUNK, linear_cross_entropy

__all__ = ["ChunkedLMLoss", "StandardLMLoss", "UnsupportedHeadError", "logit_transform", "training_loss"]

IGNORE_INDEX = -100
_TARGETS = "_leantune_targets"


class UnsupportedHeadError(ValueError):
    """The model's head or logits cannot be reproduced by the chunked loss (use the standard one)."""


def logit_transform(config: Any) -> tuple[float, float | None]:
    """``(scale, softcap)`` that the family applies to its head's output before the loss."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return scale, (float(softcap) if softcap else None)


class ChunkedLMLoss:
    """The next-token cross-entropy of ``model``, ``chunk`` tokens of logits at a time.

    ``loss = ChunkedLMLoss(model, chunk=1024)(train_model, batch)`` equals
    ``train_model(**batch).loss`` (mean over target tokens, labels shifted by one, ``-100`` ignored,
    a MoE family's router auxiliary loss added when its config asks for it), with gradients, while
    never holding more than ``chunk`` tokens' logits. ``train_model`` may be ``model`` or a wrapper
    of it (DDP, peft); ``model`` is the module whose head is used.

    Raises:
        UnsupportedHeadError: the head is not a linear layer (e.g. adapted by peft).
    """

    def __init__(self, model: nn.Module, chunk: int = DEFAULT_CHUNK) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive number of tokens, got {chunk!r}")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            kind = "no output head" if head is None else f"a {type(head).__name__} head"
            raise UnsupportedHeadError(
                f"the chunked loss needs an nn.Linear output head; this model has {kind}"
            )
        if head.weight.dtype == torch.float16:
            # fp16 gradients need the loss scale before they are rounded (or small ones flush to
            # zero); the chunked loss rounds them in forward, before backward brings the scale.
            raise UnsupportedHeadError("an fp16 head's gradients would underflow before loss scaling")
        self.chunk = chunk
        self.description = f"chunked linear cross-entropy ({chunk} tokens per chunk)"
        self.head = head
        self.config = getattr(model, "config", None)
        self.scale, self.softcap = logit_transform(self.config) if self.config is not None else (1.0, None)
        self._capturing = False
        self._captured: Tensor | None = None
        self._original = head.forward
        owner = self

        def forward(x: Tensor, **kwargs: Any) -> Tensor:
            targets = kwargs.pop(_TARGETS, None)
            if targets is not None:
                return owner._loss(x, targets, kwargs.pop("reduction", "mean"))
            if owner._capturing:
                owner._captured = x
                return x.new_zeros((*x.shape[:-1], 0))
            return owner._original(x, **kwargs)

        head.forward = forward

    def detach(self) -> None:
        """Give the head its own forward back."""
        self.head.forward = self._original

    def _loss(self, hidden: Tensor, targets: Tensor, reduction: str) -> Tensor:
        return linear_cross_entropy(
            hidden,
            self.head.weight,
            targets,
            bias=self.head.bias,
            chunk=self.chunk,
            ignore_index=IGNORE_INDEX,
            scale=self.scale,
            softcap=self.softcap,
            reduction=reduction,
        )

    def _hidden(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Any, Tensor, Tensor]:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        self._captured = None
        self._capturing = True
        try:
            out = model(**inputs)
        finally:
            self._capturing = False
        hidden, self._captured = self._captured, None
        if hidden is None:
            raise UnsupportedHeadError("the model's forward never called its output head")
        # peft prompt tuning puts its virtual tokens in front: the last L positions are the text's.
        hidden = hidden[:, -labels.shape[1] :]
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return out, hidden, targets

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The mean loss of ``batch`` (``input_ids``, ``labels``, optional ``attention_mask``,
        ``position_ids``) through ``model``, ready for ``backward``."""
        out, hidden, targets = self._hidden(model, batch)
        loss = self.head(hidden, **{_TARGETS: targets})
        aux = getattr(out, "aux_loss", None)
        coef = getattr(self.config, "router_aux_loss_coef", None)
        if aux is not None and coef:  # what the MoE families add when given labels
            loss = loss + coef * aux.to(loss.device)
        return loss

    def token_nll(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(nll, mask)``, both ``(B, L)``: each position's next-token nll in fp32 (0 where the
        target is ignored), with gradients (each position's weight arrives in backward), and which
        positions have a target. Position ``t`` predicts ``labels[:, t + 1]``."""
        _, hidden, targets = self._hidden(model, batch)
        return self.head(hidden, **{_TARGETS: targets, "reduction": "none"}), targets != IGNORE_INDEX

    @torch.no_grad()
    def nll(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(sum of the target tokens' nll in fp32, number of target tokens)`` of ``batch``."""
        _, hidden, targets = self._hidden(model, batch)
        total = self.head(hidden, **{_TARGETS: targets, "reduction": "sum"})
        return total, (targets != IGNORE_INDEX).sum()

    @torch.no_grad()
    def check(
        self, model: nn.Module, *, device: torch.device | None = None, length: int = 12
    ) -> tuple[float, float]:
        """Compare with the family's own loss on a fixed probe batch; returns ``(ours, theirs)``.

        Raises:
            UnsupportedHeadError: they differ beyond the rounding of the head's dtype.
        """
        vocab = self.head.out_features
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embed is not None and hasattr(embed, "num_embeddings"):
            vocab = min(vocab, embed.num_embeddings)
        if device is None:
            device = self.head.weight.device
        gen = torch.Generator().manual_seed(1234)  # leaves the global RNG (the run's data, dropout) alone
        ids = torch.randint(0, vocab, (2, length), generator=gen)
        labels = ids.clone()
        labels[0, : length // 3] = IGNORE_INDEX
        batch = {"input_ids": ids.to(device), "labels": labels.to(device)}
        was_training = model.training
        model.eval()
        try:
            theirs = float(model(**batch).loss)
            ours = float(self(model, batch))
        finally:
            model.train(was_training)
        low = self.head.weight.dtype != torch.float32
        tol = (3e-2 if low else 1e-4) * max(1.0, abs(theirs))
        if not (math.isfinite(ours) and abs(ours - theirs) <= tol):
            raise UnsupportedHeadError(
                f"on a probe batch the chunked loss gives {ours:.6f} where {type(model).__name__}'s own loss "
                f"gives {theirs:.6f}: this family treats its logits in a way leantune does not reproduce"
            )
        return ours, theirs


class StandardLMLoss:
    """The family's own loss (``model(**batch).loss``, full logits): ``train.loss_chunk=0``."""

    description = "standard (full logits)"

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return model(**batch).loss


def training_loss(
    model: nn.Module, chunk: int, *, device: torch.device | None = None, refuse: str | None = None
) -> tuple[Any, str | None]:
    """The loss the trainer uses for ``train.loss_chunk=chunk``, and a warning when it had to fall
    back to the standard loss (a head or a family the chunked loss does not reproduce, or the
    caller's ``refuse`` reason)."""
    if chunk == 0:
        return StandardLMLoss(), None
    if refuse:
        return StandardLMLoss(), f"{refuse}: using the standard loss (full logits)"
    try:
        loss = ChunkedLMLoss(model, chunk)
    except UnsupportedHeadError as err:
        return StandardLMLoss(), f"{err}: using the standard loss (full logits)"
    try:
        loss.check(model, device=device)
    except UnsupportedHeadError as err:
        loss.detach()
        return StandardLMLoss(), f"{err}: using the standard loss (full logits)"
    return loss, None
