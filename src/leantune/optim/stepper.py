"""``.backward(loss)`` for ordinary (non-fused) optimizers, so one training loop serves all."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from leantune.optim.engine import BackwardResult, FusedOptimizer
from leantune.optim.precision import LossScaler

__all__ = ["Stepper", "as_stepper"]


class Stepper:
    """Gives a standard ``torch.optim`` optimizer the fused optimizers' ``backward`` API.

    ``stepper.backward(loss)`` runs ``backward`` on ``loss / accumulation_steps`` (times the loss
    scale); every ``accumulation_steps`` calls it unscales the gradients, clips them
    (``torch.nn.utils.clip_grad_value_`` / ``clip_grad_norm_``), skips the step when they are not
    finite, then calls ``optimizer.step()`` and ``optimizer.zero_grad()``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` that is not fused into backward.
        clip_grad_norm: global gradient-norm clipping threshold, or ``None``.
        clip_grad_value: per-element clipping threshold, or ``None``.
        loss_scale: ``None``, a static scale, ``"dynamic"`` or a :class:`LossScaler`.
        accumulation_steps: backward calls per optimizer step.
        create_graph: keep the graph of the gradients (second-order optimizers such as Sophia).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float | str | LossScaler | None = None,
        accumulation_steps: int = 1,
        create_graph: bool = False,
    ) -> None:
        if isinstance(optimizer, FusedOptimizer):
            raise TypeError("fused optimizers already have .backward(); use them directly")
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if value is not None and not value > 0:
                raise ValueError(f"Invalid {name}: {value!r} (must be > 0 or None)")
        if (
            isinstance(accumulation_steps, bool)
            or not isinstance(accumulation_steps, int)
            or accumulation_steps < 1
        ):
            raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} (must be an int >= 1)")
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.loss_scaler = LossScaler.from_spec(loss_scale)
        self.accumulation_steps = accumulation_steps
        self.create_graph = create_graph
        self._micro_step = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def backward(self, loss: Tensor) -> BackwardResult:
        """Backward on one micro-batch's mean loss; steps every ``accumulation_steps`` calls."""
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        reported = self.loss_scaler.scale if self.loss_scaler is not None else None
        factor = scale / self.accumulation_steps
        with warnings.catch_warnings():
            # create_graph makes param <-> grad cycles; zero_grad(set_to_none) below breaks them.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            (loss * factor if factor != 1.0 else loss).backward(create_graph=self.create_graph)
        self._micro_step += 1
        if self._micro_step < self.accumulation_steps:
            return BackwardResult(updated=False, loss_scale=reported)
        self._micro_step = 0
        params = self._params_with_grad()
        if scale != 1.0:
            for p in params:
                p.grad.mul_(1.0 / scale)
        if self.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.clip_grad_value)
        dynamic = self.loss_scaler is not None and self.loss_scaler.dynamic
        if self.clip_grad_norm is not None or dynamic:
            max_norm = self.clip_grad_norm if self.clip_grad_norm is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            # Measured without clipping too (one read of the gradients, one host sync per step):
            # a step on an inf/nan gradient would write NaN into the weights and the moments.
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.loss_scaler is not None:
                self.loss_scaler.update(overflow=True)
            return BackwardResult(updated=False, skipped=True, grad_norm=grad_norm, loss_scale=reported)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow=False)
        return BackwardResult(updated=True, grad_norm=grad_norm, loss_scale=reported)

    def zero_grad(self) -> None:
        """Drop gradients and any partially accumulated step."""
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), **self.engine_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_engine_state_dict(state)

    def engine_state_dict(self) -> dict[str, Any]:
        """The stepper's own state (micro-step counter and loss scaler), without the optimizer's."""
        return {
            "micro_step": self._micro_step,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
        }

    def load_engine_state_dict(self, state: dict[str, Any]) -> None:
        self._micro_step = int(state["micro_step"])
        if state.get("loss_scaler") is not None:
            if self.loss_scaler is None:
                self.loss_scaler = LossScaler()
            self.loss_scaler.load_state_dict(state["loss_scaler"])


def as_stepper(optimizer: torch.optim.Optimizer, **engine_kwargs: Any) -> FusedOptimizer | Stepper:
    """The object with ``.backward(loss)`` for ``optimizer``: itself when fused, else a
    :class:`Stepper` built with ``engine_kwargs`` (clipping, loss scaling, accumulation)."""
    if isinstance(optimizer, FusedOptimizer):
        if engine_kwargs:
            raise TypeError("pass clipping/accumulation options to the fused optimizer's constructor")
        return optimizer
    return Stepper(optimizer, **engine_kwargs)
