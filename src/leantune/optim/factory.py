"""``build_optimizer(name, model, **kwargs)``: every optimizer leantune offers, by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from leantune.optim.adalomo import AdaLomo
from leantune.optim.competitors import COMPETITORS, build_competitor
from leantune.optim.engine import FusedOptimizer, ParamsLike
from leantune.optim.in_backward import InBackward
from leantune.optim.lomo import LOMO

__all__ = [
    "build_optimizer",
    "optimizer_names",
    "is_elementwise",
    "is_fused",
    "is_competitor",
    "resume_refusal",
    "ENGINE_KWARGS",
]

# Options handled by the fused engine (or by leantune.optim.Stepper for ordinary optimizers).
ENGINE_KWARGS = ("clip_grad_norm", "clip_grad_value", "loss_scale", "accumulation_steps", "rounding", "seed")
IN_BACKWARD_SUFFIX = "_in_backward"


def _pytorch_optimizer(name: str) -> Callable[..., type[torch.optim.Optimizer]]:
    def load() -> type[torch.optim.Optimizer]:
        import pytorch_optimizer  # imported lazily: it is only needed for these optimizers

        return getattr(pytorch_optimizer, name)

    return load


# name -> (loader of the class, one-line description)
_REGISTRY: dict[str, tuple[Callable[[], type[torch.optim.Optimizer]], str]] = {
    "adalomo": (lambda: AdaLomo, "leantune AdaLomo, fused into backward (default)"),
    "lomo": (lambda: LOMO, "leantune LOMO (SGD) fused into backward"),
    "adamw": (lambda: torch.optim.AdamW, "torch.optim.AdamW"),
    "sgd": (lambda: torch.optim.SGD, "torch.optim.SGD"),
    "adafactor": (lambda: torch.optim.Adafactor, "torch.optim.Adafactor"),
    "lion": (_pytorch_optimizer("Lion"), "pytorch_optimizer.Lion"),
    "adan": (_pytorch_optimizer("Adan"), "pytorch_optimizer.Adan"),
    "sophia": (_pytorch_optimizer("SophiaH"), "pytorch_optimizer.SophiaH (needs create_graph)"),
}

# Already fused, or needing the whole graph of the gradients (Hessian estimates), so not wrappable.
# The competitors (leantune.optim.competitors) are built from a model by their own packages.
_NOT_IN_BACKWARD = ("adalomo", "lomo", "sophia")


def optimizer_names() -> dict[str, str]:
    """Known names with a one-line description (``<name>_in_backward`` works for leantune's and
    torch's, not for the competitors from other packages)."""
    names = {k: v[1] for k, v in _REGISTRY.items()}
    for key, (_, desc) in _REGISTRY.items():
        if key not in _NOT_IN_BACKWARD:
            names[key + IN_BACKWARD_SUFFIX] = f"{desc}, stepped inside backward by leantune.optim.InBackward"
    names.update({k: c.description for k, c in COMPETITORS.items()})
    return names


def _resolve(name: str) -> tuple[str, bool]:
    key = name.lower().replace("-", "_")
    in_backward = key.endswith(IN_BACKWARD_SUFFIX)
    base = key[: -len(IN_BACKWARD_SUFFIX)] if in_backward else key
    known_base = base in _REGISTRY or (base in COMPETITORS and not in_backward)
    if not known_base or (in_backward and base in _NOT_IN_BACKWARD):
        known = list(optimizer_names())
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown optimizer {name!r}.{hint} Known: {', '.join(known)}")
    return base, in_backward


def is_fused(name: str) -> bool:
    """Whether the optimizer called ``name`` updates inside backward (has ``.backward(loss)``)."""
    base, in_backward = _resolve(name)
    return in_backward or base in ("adalomo", "lomo")


# Updates that are elementwise given the (full-size) gradient: exact on any shard of a tensor.
_ELEMENTWISE = ("lomo", "adamw", "sgd", "lion", "adan")


def is_elementwise(name: str) -> bool:
    """Whether each element's update depends only on that element (and its own state): such an
    update is the same on a shard as on the whole tensor. AdaLomo is not (row/column statistics),
    but leantune sums those over the shards itself."""
    base, _ = _resolve(name)
    return base in _ELEMENTWISE


def is_competitor(name: str) -> bool:
    """Whether ``name`` is built by another package (:mod:`leantune.optim.competitors`)."""
    base, _ = _resolve(name)
    return base in COMPETITORS


def resume_refusal(name: str) -> str | None:
    """Why a checkpoint of optimizer ``name`` cannot be resumed exactly, or ``None`` if it can."""
    base, _ = _resolve(name)
    comp = COMPETITORS.get(base)
    return None if comp is None else comp.resume


def needs_create_graph(name: str) -> bool:
    """Whether backward must keep the graph of the gradients (Hessian-based optimizers)."""
    base, _ = _resolve(name)
    return base == "sophia"


def _trainable(params: ParamsLike) -> list[Any]:
    if isinstance(params, nn.Module):
        return [p for p in params.parameters() if p.requires_grad]
    return list(params)


def _refuse_engine_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    misplaced = sorted(set(kwargs) & set(ENGINE_KWARGS))
    if misplaced:
        raise ValueError(
            f"{name} is not fused into backward: pass {', '.join(misplaced)} to "
            "leantune.optim.Stepper (the trainer does this for you)"
        )


def build_optimizer(name: str, params: ParamsLike, **kwargs: Any) -> torch.optim.Optimizer:
    """Build an optimizer by name.

    Args:
        name: one of :func:`optimizer_names` (case-insensitive), e.g. ``"adalomo"``, ``"adamw"``,
            ``"adamw_in_backward"``.
        params: a model or an iterable of parameters (ordinary optimizers get only the trainable
            ones; fused optimizers keep frozen ones without hooks or state).
        **kwargs: hyperparameters of that optimizer. Fused optimizers also take the engine options
            ``clip_grad_norm``, ``clip_grad_value``, ``loss_scale``, ``accumulation_steps``,
            ``rounding`` and ``seed``; for the others pass those to :class:`leantune.optim.Stepper`.

    Raises:
        ValueError: unknown name, unknown keyword, or a bad hyperparameter value.
    """
    base, in_backward = _resolve(name)
    if base in COMPETITORS:
        _refuse_engine_kwargs(name, kwargs)
        try:
            return build_competitor(base, params, **kwargs)
        except TypeError as err:
            raise ValueError(f"optimizer {name!r}: {err}") from err
    cls = _REGISTRY[base][0]()
    fused = in_backward or issubclass(cls, FusedOptimizer)
    if not fused:
        _refuse_engine_kwargs(name, kwargs)
    try:
        if in_backward:
            return InBackward(cls, params, **kwargs)
        if fused:
            return cls(params, **kwargs)
        return cls(_trainable(params), **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):  # a misspelt option: say which optimizer
            raise ValueError(f"optimizer {name!r}: {err}") from err
        raise
