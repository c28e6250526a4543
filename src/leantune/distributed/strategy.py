"""Apply a data-parallel strategy to a model and its optimizer (``dist.strategy``).

``none``  one process.
``ddp``   replicated weights. Fused optimizers average each gradient inside their backward hooks
          (:class:`~leantune.distributed.collectives.ReplicatedCollectives`); ordinary optimizers
          use ``torch.nn.parallel.DistributedDataParallel``.
``fsdp``  FSDP2: ``fully_shard`` on every decoder layer and on the root, with a
          ``MixedPrecisionPolicy`` and optional CPU offload of parameters. Weights, gradients and
          optimizer state are sharded (dim 0) over the ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leantune.distributed.collectives import ReplicatedCollectives, ShardedCollectives
from leantune.optim import FusedOptimizer

__all__ = ["apply_fsdp", "broadcast_parameters", "decoder_layers", "wrap_model", "attach_optimizer"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM (see :func:`leantune.anatomy.find_blocks`)."""
    from leantune.anatomy import AnatomyError, find_blocks

    try:
        return [m for _, m in find_blocks(model)]
    except AnatomyError as err:
        raise ValueError(f"dist.strategy=fsdp: {err}") from None


def apply_fsdp(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    mesh: Any = None,
) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    # Embeddings and head get units of their own: left in the root they would stay unsharded, with
    # their full gradients, for the whole step (vocab x hidden each). Tied ones stay in the root.
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = inp is not None and out is not None and inp.weight is out.weight
    if not tied:
        for module in (inp, out):
            if module is not None:
                fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def broadcast_parameters(model: nn.Module) -> None:
    """Make every rank's replica equal to rank 0's (parameters and buffers)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def wrap_model(
    model: nn.Module, strategy: str, *, fused: bool, device: torch.device, dist_cfg: Any
) -> nn.Module:
    """Apply ``strategy`` in place; returns the module to call for training forward passes."""
    from leantune.models import resolve_dtype

    match strategy:
        case "none":
            return model
        case "ddp":
            broadcast_parameters(model)
            if fused:
                return model  # the optimizer's hooks average the gradients
            ids = [device.index] if device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        case "fsdp":
            if dist_cfg.cpu_offload and device.type != "cuda":
                raise ValueError(
                    "dist.cpu_offload needs CUDA: on CPU the parameters are already in host memory"
                )
            param_dtype = resolve_dtype(dist_cfg.mixed_precision) if dist_cfg.mixed_precision else None
            apply_fsdp(model, param_dtype=param_dtype, cpu_offload=dist_cfg.cpu_offload)
            return model
        case other:
            raise ValueError(f"unknown dist.strategy {other!r}: use none, ddp or fsdp")


def attach_optimizer(optimizer: torch.optim.Optimizer, strategy: str) -> None:
    """Give a fused optimizer the collectives of ``strategy`` (before its first step)."""
    if not isinstance(optimizer, FusedOptimizer) or strategy == "none":
        return
    if strategy == "ddp":
        optimizer.collectives = ReplicatedCollectives()
    elif strategy == "fsdp":
        optimizer.collectives = ShardedCollectives()  # InBackward refuses non-elementwise updates
