"""LOMO: SGD fused into the backward pass (Lv et al., 2023, arXiv 2306.09782)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from leantune.optim.engine import (
    FusedOptimizer,
    GradientView,
    ParamsLike,
    UpdateTarget,
    as_rows,
    check_lr_and_weight_decay,
)
from leantune.optim.precision import LossScaler, WriteBack

__all__ = ["LOMO", "lomo_update"]


def lomo_update(
    param: Tensor,
    grad: GradientView,
    *,
    lr: float,
    weight_decay: float,
    writer: WriteBack,
    compensation: Tensor | None = None,
    chunk_elements: int,
) -> None:
    """Apply one LOMO (SGD with decoupled weight decay) step to ``param`` in place.

    ``p <- p * (1 - lr * wd) - lr * g``, computed in fp32 chunk by chunk and written back in the
    parameter's dtype by ``writer``.
    """
    rows = as_rows(param)
    comp_rows = as_rows(compensation) if compensation is not None else None
    decay = 1.0 - lr * weight_decay
    for sl in grad.chunks(chunk_elements):
        g = grad.chunk(sl)

        def step(w: Tensor, g: Tensor = g) -> None:
            if decay != 1.0:
                w.mul_(decay)
            w.add_(g, alpha=-lr)

        writer.apply(rows[sl], step, comp_rows[sl] if comp_rows is not None else None)
        del g, step  # else this chunk's copy lives on while the next one is built


class LOMO(FusedOptimizer):
    r"""LOMO: LOw-Memory Optimization, plain SGD applied inside ``backward()``.

    For each parameter tensor :math:`p` with effective gradient :math:`g` (unscaled, clamped to
    ``clip_grad_value``, multiplied by the global clip coefficient, averaged over accumulation
    steps):

    .. math::
        p \leftarrow p\,(1 - \eta\lambda) - \eta\, g

    with learning rate :math:`\eta` and decoupled weight decay :math:`\lambda`, computed in fp32 and
    written back in the weight's dtype (see ``rounding``).

    Memory: the weights, plus one parameter's gradient at a time (the largest tensor), plus an fp32
    accumulation buffer (4 bytes per trainable parameter) only when ``accumulation_steps > 1``.

    Cost of clipping: ``clip_grad_value`` is free; ``clip_grad_norm`` is exact (the global norm is
    known before the first update) and costs one extra backward pass per step, because the first
    pass only measures the norm. Dynamic fp16 loss scaling needs the same measuring pass.

    Args:
        params: a model or an iterable of parameters / ``(name, parameter)`` pairs / param groups.
        lr: learning rate (SGD scale, the paper recommends 1e-2 .. 3e-2 with clipping 1.0).
        weight_decay: decoupled weight decay.
        clip_grad_norm: global gradient-norm clipping threshold, or ``None``.
        clip_grad_value: per-element gradient clipping threshold, or ``None``.
        loss_scale: ``None``, a static scale, ``"dynamic"`` or a :class:`LossScaler` (fp16).
        accumulation_steps: ``opt.backward`` calls per update.
        rounding: ``"nearest"``, ``"stochastic"`` or ``"kahan"`` write-back for bf16/fp16 weights.
        seed: seed of the stochastic-rounding generator.
        collectives: ``"auto"`` (finds FSDP2 shards; refuses DDP/FSDP1 wrappers), ``"replicated"``,
            ``"local"``, ``"sharded"`` or a Collectives instance: see
            :class:`~leantune.optim.engine.FusedOptimizer`.

    Example:
        >>> opt = LOMO(model, lr=1e-2, clip_grad_norm=1.0)
        >>> result = opt.backward(model(**batch).loss)
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        *,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float | str | LossScaler | None = None,
        accumulation_steps: int = 1,
        rounding: str = "nearest",
        seed: int = 0,
        collectives: Any = "auto",
    ) -> None:
        check_lr_and_weight_decay(lr, weight_decay)
        super().__init__(
            params,
            {"lr": lr, "weight_decay": weight_decay},
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            loss_scale=loss_scale,
            accumulation_steps=accumulation_steps,
            rounding=rounding,
            seed=seed,
            collectives=collectives,
        )

    def _update(
        self, target: UpdateTarget, grad: GradientView, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        lomo_update(
            target.tensor,
            grad,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            writer=self.writer,
            compensation=self._compensation(target.tensor, state),
            chunk_elements=self.chunk_elements,
        )
