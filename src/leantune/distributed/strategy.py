"""Apply a data-parallel strategy to a model and its optimizer (``dist.strategy``).

``none``  one process.
``ddp``   replicated weights. Fused optimizers average each gradient inside their backward hooks
          (:class:`~leantune.distributed.collectives.ReplicatedCollectives`); ordinary optimizers
          use ``torch.nn.parallel.DistributedDataParallel``.
``fsdp``  FSDP2: ``fully_shard`` on every decoder layer and on the root, with a
          ``MixedPrecisionPolicy`` and optional CPU offload of parameters. Weights, gradients and
          optimizer state are sharded (dim 0) over the ranks.

With ``dist.tp > 1`` the model is first split by tensor parallelism over the ``tp`` dimension of a
``(dp, tp)`` device mesh (:mod:`leantune.distributed.tensor_parallel`), and the strategy applies
to the ``dp`` dimension; the fused optimizers get :class:`~leantune.distributed.collectives.MeshCollectives`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leantune.distributed.collectives import MeshCollectives, ReplicatedCollectives, ShardedCollectives
from leantune.optim import FusedOptimizer

__all__ = [
    "apply_fsdp",
    "attach_optimizer",
    "broadcast_parameters",
    "decoder_layers",
    "mesh_collectives",
    "wrap_model",
]


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


def _fsdp_dtype(dist_cfg: Any) -> torch.dtype | None:
    from leantune.models import resolve_dtype

    return resolve_dtype(dist_cfg.mixed_precision) if dist_cfg.mixed_precision else None


def broadcast_parameters(model: nn.Module) -> None:
    """Make every rank's replica equal to rank 0's (parameters and buffers)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def wrap_model(
    model: nn.Module, strategy: str, *, fused: bool, device: torch.device, dist_cfg: Any, mesh: Any = None
) -> nn.Module:
    """Apply ``strategy`` in place; returns the module to call for training forward passes.

    ``mesh``: the job's ``(dp, tp)`` device mesh when ``dist_cfg.tp > 1``; the model is then split
    over its ``tp`` dimension first (every rank holds the same full weights before).
    """

    if getattr(dist_cfg, "tp", 1) > 1:
        from leantune.distributed.tensor_parallel import apply_tensor_parallel

        if not fused:
            raise ValueError("dist.tp needs an optimizer fused into backward (adalomo, lomo, *_in_backward)")
        broadcast_parameters(model)  # rank 0's weights everywhere, then each keeps its shard
        apply_tensor_parallel(model, mesh["tp"])
        if strategy == "fsdp":  # FSDP2 over the dp dimension of the same mesh: 2-D shards
            apply_fsdp(
                model, param_dtype=_fsdp_dtype(dist_cfg), cpu_offload=dist_cfg.cpu_offload, mesh=mesh["dp"]
            )
        return model
    match strategy:
        case "none":
            return model
        case "ddp":
            if not dist.is_initialized() or dist.get_world_size() == 1:
                return model  # one replica: DDP's buckets would only copy every gradient
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
            apply_fsdp(model, param_dtype=_fsdp_dtype(dist_cfg), cpu_offload=dist_cfg.cpu_offload)
            return model
        case other:
            raise ValueError(f"unknown dist.strategy {other!r}: use none, ddp or fsdp")


def mesh_collectives(mesh: Any, strategy: str) -> MeshCollectives:
    """The fused optimizers' collectives on a ``(dp, tp)`` mesh: under ``ddp`` gradients averaged
    over ``dp`` in the hooks; under ``fsdp`` FSDP2 has reduce-scattered them already (the
    parameters' placements show the ``dp`` shards)."""
    dp = mesh["dp"]
    return MeshCollectives(dp_group=dp.get_group() if dp.size() > 1 and strategy == "ddp" else None)


def attach_optimizer(optimizer: torch.optim.Optimizer, strategy: str, mesh: Any = None) -> None:
    """Give a fused optimizer the collectives of ``strategy`` (before its first step); with a
    ``(dp, tp)`` ``mesh`` of tensor parallelism, the mesh collectives with ``dp`` as the
    data-parallel group."""
    if not isinstance(optimizer, FusedOptimizer):
        return
    if mesh is not None and mesh["tp"].size() > 1:
        optimizer.collectives = mesh_collectives(mesh, strategy)
        return
    if strategy == "none":
        return
    if strategy == "ddp":
        optimizer.collectives = ReplicatedCollectives()
    elif strategy == "fsdp":
        optimizer.collectives = ShardedCollectives()  # InBackward refuses non-elementwise updates
