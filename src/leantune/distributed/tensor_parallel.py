"""Tensor parallelism (``dist.tp``) with PyTorch's DTensor engine and the model's own plan.

transformers declares, per family, which linear layers split by output features (``colwise``: q, k,
v, gate, up) and which by input features (``rowwise``: o, down), as ``model._tp_plan`` (from
``config.base_model_tp_plan``). :func:`apply_tensor_parallel` applies that plan with
``torch.distributed.tensor.parallel.parallelize_module`` (``ColwiseParallel`` / ``RowwiseParallel``:
one all-reduce of the activations after each row-wise layer in forward, one of the input
gradients before each column-wise group in backward), so attention runs on ``heads / tp`` local
heads and the MLP on ``intermediate / tp`` local features. No communication code of our own.

Embeddings and the LM head stay whole on every rank (the plan's ``embedding_rowwise`` and
``colwise_gather_output`` entries are not applied): their gradients are equal on every rank, and
the fused optimizers count them once in the gradient norm. Families whose plan needs other styles
(MoE experts, packed layouts) are refused with the styles named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["TensorParallelError", "TensorParallelReport", "apply_tensor_parallel", "tp_plan"]

_APPLIED = ("colwise", "rowwise")
# Left whole on every rank: the vocabulary-sized layers (their memory, not their compute, is what a
# split would save, and a whole head keeps the chunked loss and generation unchanged).
_KEPT_WHOLE = ("embedding_rowwise", "colwise_gather_output", "colwise_rep", "gather")


class TensorParallelError(ValueError):
    """The model cannot be split as asked (no plan, unsupported styles, sizes that do not divide)."""


@dataclass(frozen=True)
class TensorParallelReport:
    """What :func:`apply_tensor_parallel` did.

    Attributes:
        tp: the tensor-parallel degree.
        colwise: names of the linear layers split by output features.
        rowwise: names of the linear layers split by input features.
        whole: names of the planned modules kept whole (embeddings, head).
    """

    tp: int
    colwise: tuple[str, ...]
    rowwise: tuple[str, ...]
    whole: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"tensor parallel over {self.tp} ranks: {len(self.colwise)} column-wise and "
            f"{len(self.rowwise)} row-wise linear layers split; "
            f"{', '.join(self.whole) or 'nothing'} kept whole"
        )


def tp_plan(model: nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan: module-name pattern -> style, with ``*`` for a layer index.

    Raises:
        TensorParallelError: the family has none (e.g. GPT-2 in transformers 5).
    """
    plan = dict(getattr(model, "_tp_plan", None) or {})
    if not plan:
        base = getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {}
        prefix = getattr(model, "base_model_prefix", "")
        plan = {(f"{prefix}.{k}" if prefix and hasattr(model, prefix) else k): v for k, v in base.items()}
    if not plan:
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise TensorParallelError(
            f"dist.tp: {type(model).__name__} ({family}) has no tensor-parallel plan: transformers "
            "declares none for this family (model._tp_plan and config.base_model_tp_plan are empty), "
            "so it is not known which layers split by rows and which by columns. Use dist.tp=1 with "
            "dist.strategy=fsdp to shard it instead"
        )
    return plan


def _pattern(name: str) -> str:
    # transformers' plans write layer indices as '*': model.layers.3.mlp -> model.layers.*.mlp
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _config_value(model: nn.Module, key: str) -> Any:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    return getattr(text, key, None)


def apply_tensor_parallel(model: nn.Module, mesh: Any) -> TensorParallelReport:
    """Split ``model``'s linear layers over the 1-D device mesh ``mesh`` following its plan.

    Every rank must hold the same full weights before the call (the same seed or checkpoint); each
    keeps its shard. Head counts and the split dimensions must divide by the mesh size.

    Raises:
        TensorParallelError: no plan, styles that are not applied, or sizes that do not divide.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    plan = tp_plan(model)
    heads = {k: _config_value(model, k) for k in ("num_attention_heads", "num_key_value_heads")}
    for key, value in heads.items():
        if isinstance(value, int) and value % tp:
            raise TensorParallelError(f"dist.tp={tp} must divide {key} = {value}")
    matched: dict[str, list[str]] = {}
    unsupported: dict[str, list[str]] = {}
    linear_only: list[str] = []
    for name, module in model.named_modules():
        style = plan.get(_pattern(name)) if name else None
        if style is None:
            continue
        if style in _APPLIED:
            if not isinstance(module, nn.Linear):
                linear_only.append(f"{name} ({type(module).__name__})")
                continue
            features = module.out_features if style == "colwise" else module.in_features
            if features % tp:
                raise TensorParallelError(
                    f"dist.tp={tp} must divide the {'output' if style == 'colwise' else 'input'} "
                    f"features of {name} ({features})"
                )
        elif style not in _KEPT_WHOLE:
            unsupported.setdefault(style, []).append(name)
            continue
        matched.setdefault(style, []).append(name)
    for name, _ in model.named_parameters():  # plans may name parameters (packed experts)
        style = plan.get(_pattern(name))
        if style is not None and style not in _APPLIED + _KEPT_WHOLE:
            unsupported.setdefault(style, []).append(name)
    if unsupported or linear_only:
        parts = [
            f"{style} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
            for style, names in unsupported.items()
        ]
        if linear_only:
            parts.append(f"colwise/rowwise on modules that are not nn.Linear ({', '.join(linear_only[:2])})")
        raise TensorParallelError(
            f"dist.tp: {type(model).__name__}'s tensor-parallel plan needs styles leantune does not "
            f"apply: {'; '.join(parts)}. Supported: {', '.join(_APPLIED)} on nn.Linear layers (dense "
            "attention and MLP); MoE experts and packed layouts are not. Use dist.strategy=fsdp instead"
        )
    if not matched.get("colwise") or not matched.get("rowwise"):
        raise TensorParallelError(
            f"dist.tp: none of {type(model).__name__}'s modules matches its tensor-parallel plan "
            f"({', '.join(sorted(plan)[:3])}, ...): the module names differ from the family's"
        )
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(
        model,
        mesh,
        {name: styles[style]() for style in _APPLIED for name in matched[style]},
    )
    for parent in sorted({name.rpartition(".")[0] for name in matched["colwise"]}):
        _replicate_input(model.get_submodule(parent), mesh)
    whole = tuple(sorted({n for s in _KEPT_WHOLE for n in matched.get(s, ())}))
    return TensorParallelReport(tp, tuple(matched["colwise"]), tuple(matched["rowwise"]), whole)


def _replicate_input(block: nn.Module, mesh: Any) -> None:
    """Hand ``block`` (an attention or MLP module) its hidden states as one replicated DTensor.

    Its column-wise layers (q, k, v; gate, up) then share that input, so in backward their partial
    input gradients are summed first and all-reduced once at the block's entry, as Megatron does,
    instead of once per layer (5 all-reduces per decoder layer become 2). The hidden states are the
    first positional argument or the ``hidden_states`` keyword, as transformers' decoder layers pass
    them.
    """
    from torch.distributed.tensor import DTensor, Replicate

    def as_replicated(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return x

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": as_replicated(kwargs["hidden_states"])}
        elif args:
            args = (as_replicated(args[0]), *args[1:])
        return args, kwargs

    block.register_forward_pre_hook(hook, with_kwargs=True)
