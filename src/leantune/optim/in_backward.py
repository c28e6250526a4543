"""Any per-parameter ``torch.optim`` optimizer, applied inside backward by the fused engine."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from leantune.optim.engine import FusedOptimizer, GradientView, ParamsLike, UpdateTarget
from leantune.optim.precision import LossScaler

__all__ = ["InBackward"]

_STRUCTURAL_KEYS = ("params", "param_names")
# Optimizers that count steps in their param group (pytorch_optimizer's Adan: group["step"]) keep
# per-tensor state there, since every inner optimizer has one tensor; each update copies it into the
# tensor's state under this prefix (so state_dict carries it), and binding a state restores it.
_GROUP_STATE = "inner_group."
# torch.optim / pytorch_optimizer classes whose update is elementwise: exact on a shard.
_ELEMENTWISE = ("AdamW", "Adam", "SGD", "Lion", "Adan")


class InBackward(FusedOptimizer):
    """Run any per-parameter optimizer (AdamW, Adafactor, SGD, Lion, ...) inside ``backward()``.

    One instance of ``optimizer_cls`` is kept per trainable parameter (as in torchtune's optimizer
    in backward) and stepped from that parameter's gradient hook, after which the gradient is freed.
    The optimizer's own state (e.g. AdamW's two moments, 8 bytes per parameter) is unchanged; what
    is saved is the gradient memory, and, unlike torchtune, clipping, accumulation and loss scaling
    keep working (see :class:`~leantune.optim.engine.FusedOptimizer`).

    The outer ``param_groups`` are the ones to schedule: their hyperparameters are copied to the
    per-parameter optimizers before each update. State lives in ``self.state`` (shared with the
    inner optimizers), so ``state_dict`` / ``load_state_dict`` work as for any torch optimizer.

    With ``rounding="stochastic"`` or ``"kahan"``, bf16/fp16 parameters are updated on an fp32 copy
    (so the inner optimizer's state is fp32 too) and rounded back; with ``"nearest"`` the inner
    optimizer works on the parameter directly, exactly as it would outside backward.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass that updates each parameter
            independently (not e.g. LBFGS).
        params: a model or an iterable of parameters / ``(name, parameter)`` pairs / param groups.
        clip_grad_norm, clip_grad_value, loss_scale, accumulation_steps, rounding, seed, collectives: see
            :class:`~leantune.optim.engine.FusedOptimizer`.
        **optimizer_kwargs: hyperparameters of ``optimizer_cls`` (validated by it).

    Example:
        >>> opt = InBackward(torch.optim.AdamW, model, lr=3e-4, weight_decay=0.1)
        >>> opt.backward(loss)
    """

    def __init__(
        self,
        optimizer_cls: type[torch.optim.Optimizer],
        params: ParamsLike,
        *,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float | str | LossScaler | None = None,
        accumulation_steps: int = 1,
        rounding: str = "nearest",
        seed: int = 0,
        collectives: Any = "auto",
        **optimizer_kwargs: Any,
    ) -> None:
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
        if issubclass(optimizer_cls, (FusedOptimizer, torch.optim.LBFGS)):
            raise TypeError(f"{optimizer_cls.__name__} cannot run inside backward")
        # A throw-away instance validates the hyperparameters and tells us the defaults.
        probe = optimizer_cls([torch.zeros(1, requires_grad=True)], **optimizer_kwargs)
        defaults = {k: v for k, v in probe.defaults.items() if k not in _STRUCTURAL_KEYS}
        self.optimizer_cls = optimizer_cls
        self.optimizer_kwargs = dict(optimizer_kwargs)
        # one inner optimizer per parameter (or per segment of one), with a handle it steps
        self._inner: dict[Any, tuple[torch.optim.Optimizer, Tensor]] = {}
        # targets whose state init_state() made and no update has used yet (see _init_param_state)
        self._fresh: set[Any] = set()
        super().__init__(
            params,
            defaults,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            loss_scale=loss_scale,
            accumulation_steps=accumulation_steps,
            rounding=rounding,
            seed=seed,
            collectives=collectives,
        )

    def _check_collectives(self) -> None:
        if self.collectives.sharded and self.optimizer_cls.__name__ not in _ELEMENTWISE:
            raise ValueError(
                f"{self.optimizer_cls.__name__} in backward on FSDP2 shards would compute its statistics "
                f"on one shard of each tensor; use AdaLomo, LOMO, or one of {', '.join(_ELEMENTWISE)} "
                "in backward (elementwise updates are exact on a shard)"
            )

    def __repr__(self) -> str:
        return f"InBackward({self.optimizer_cls.__name__}, {self.defaults})"

    def _inner_for(self, target: UpdateTarget, state: dict[str, Any]) -> tuple[torch.optim.Optimizer, Tensor]:
        entry = self._inner.get(target.key)
        if entry is None:
            # ``handle`` is a stable leaf the inner optimizer owns; before each step its ``.data``
            # is pointed at the parameter's (local) storage, or at an fp32 copy of it.
            handle = torch.empty(0, dtype=torch.float32, device=target.tensor.device)
            inner = self.optimizer_cls([handle], **self.optimizer_kwargs)
            entry = (inner, handle)
            self._inner[target.key] = entry
            self._bind(inner, handle, state)
        elif entry[0].state[entry[1]] is not state:
            # The parameter was frozen (its state dropped) and is trainable again: start afresh.
            self._bind(*entry, state)
        return entry

    def _group_counters(self, inner: torch.optim.Optimizer) -> dict[str, Any]:
        """The inner param group's own entries (not the hyperparameters the outer groups give it),
        e.g. Adan's step count."""
        outer = set(_STRUCTURAL_KEYS).union(self.defaults, *self.param_groups)
        return {k: v for k, v in inner.param_groups[0].items() if k not in outer}

    def _bind(self, inner: torch.optim.Optimizer, handle: Tensor, state: dict[str, Any]) -> None:
        """Make ``state`` the inner optimizer's state, its param group's own counters included."""
        inner.state[handle] = state
        group = inner.param_groups[0]
        for key in self._group_counters(inner):
            del group[key]
        for key, value in state.items():
            if isinstance(key, str) and key.startswith(_GROUP_STATE):
                group[key[len(_GROUP_STATE) :]] = value.item() if torch.is_tensor(value) else value

    def _init_param_state(self, target: UpdateTarget, state: dict[str, Any]) -> None:
        # torch optimizers create their state inside step(): run one step with a zero gradient and
        # lr = 0 on a throw-away copy of the parameter, then reset the step counter.
        inner, handle = self._inner_for(target, state)
        local = target.tensor
        handle.data = local.detach().to(self._work_dtype(local), copy=True)
        handle.grad = torch.zeros_like(handle.data)
        group = inner.param_groups[0]
        before = dict(group)
        group.update({k: 0.0 for k in ("lr", "weight_decay") if k in group})
        inner.step()
        # the group as it was: lr, weight decay, and counters the step created or advanced
        group.clear()
        group.update(before)
        handle.grad = None
        handle.data = torch.empty(0, dtype=handle.dtype, device=handle.device)
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
        # Some optimizers start their state from the first gradient (Adan: previous_grad); the
        # first real update starts from an empty state instead, as it would without init_state.
        self._fresh.add(target.key)

    def _work_dtype(self, local: Tensor) -> torch.dtype:
        exact = local.dtype in (torch.float32, torch.float64) or self.rounding == "nearest"
        return local.dtype if exact else torch.float32

    def _after_load(self) -> None:
        # The inner optimizers' states must be the (new) objects in self.state.
        self._inner.clear()
        self._fresh.clear()

    def _update(
        self, target: UpdateTarget, grad: GradientView, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        local = target.tensor
        inner, handle = self._inner_for(target, state)
        if target.key in self._fresh:
            self._fresh.discard(target.key)
            state.clear()
        inner_group = inner.param_groups[0]
        for key, value in group.items():
            if key not in _STRUCTURAL_KEYS:
                inner_group[key] = value
        g = grad.full().view(local.shape)
        if self._work_dtype(local) == local.dtype:
            handle.data = local
            handle.grad = g.to(local.dtype)
            inner.step()
        else:
            handle.data = local.float()
            handle.grad = g
            inner.step()
            # The update already happened on the fp32 copy; round it back into the parameter.
            self.writer.apply(local, lambda w: w.copy_(handle.data), self._compensation(local, state))
        handle.grad = None
        handle.data = torch.empty(0, dtype=handle.dtype, device=handle.device)
        # At every update, not only in state_dict: a segment's state is a fresh view each time, so
        # _inner_for binds (and restores from) it at every update.
        for key, value in self._group_counters(inner).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                dtype = torch.int64 if isinstance(value, int) else torch.float64
                state[_GROUP_STATE + key] = torch.tensor(value, dtype=dtype)
