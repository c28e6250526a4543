"""Collectives for the fused optimizers under data parallelism (DDP) and FSDP2 sharding.

* :class:`ReplicatedCollectives` (``dist.strategy=ddp``): each rank holds full weights and computes
  a full gradient per parameter; the hook averages it over the ranks before the update, so every
  replica applies the identical update (the peers' defect: without this, replicas drift apart).
* :class:`ShardedCollectives` (``dist.strategy=fsdp``): FSDP2 reduce-scatters gradients, so each
  rank updates its own rows of every parameter. Statistics that span the whole tensor (AdaLomo's
  column means, mean row statistic, update and weight RMS; the global gradient norm) are summed
  over the shards, which makes the update equal to a single process's.
* :class:`MeshCollectives` (``dist.tp``): DTensor parameters of any ``Shard``/``Replicate`` layout on
  an n-D device mesh (tensor parallelism's row- and column-wise shards, composed with FSDP2), plain
  tensors replicated beside them, and optionally a data-parallel group over which replicated
  gradients are averaged. Each partial statistic is summed over exactly the mesh dimensions that
  split the axis it was summed over.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from leantune.optim.collectives import Collectives

__all__ = [
    "MeshCollectives",
    "ReplicatedCollectives",
    "ShardedCollectives",
    "detect_collectives",
    "named_collectives",
    "world_size",
]


def world_size() -> int:
    """Ranks of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def detect_collectives(params: Iterable[Tensor]) -> Collectives | None:
    """The collectives that trainable ``params`` call for: sharded for FSDP2 shards, ``None`` for
    plain tensors (the caller decides: one process, or a choice to be made).

    Raises:
        ValueError: DTensors that are not FSDP2's ``Shard(0)`` on a 1-D mesh (tensor parallelism),
            or shards mixed with plain tensors.
    """
    shards, plain = [], 0
    for p in params:
        if not p.requires_grad:
            continue
        if hasattr(p, "device_mesh"):
            shards.append(p)
        else:
            plain += 1
    if not shards:
        return None
    from torch.distributed.tensor import Shard

    if any(p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) for p in shards):
        return _tensor_parallel_collectives(shards)
    # FSDP2 makes a mesh object per fully_shard call: equal meshes, not one object
    same_mesh = all(p.device_mesh == shards[0].device_mesh for p in shards)
    if plain or not same_mesh:
        raise ValueError(
            f"{plain} trainable parameters are plain tensors next to {len(shards)} FSDP2 shards"
            if plain
            else "the shards lie on different device meshes"
        )
    return ShardedCollectives(shards[0].device_mesh.get_group())


def _tensor_parallel_collectives(shards: list[Tensor]) -> Collectives:
    """Auto-detected collectives of a tensor-parallel model (DTensors other than FSDP2's layout):
    every rank of the job must lie on the parameters' mesh, or the data-parallel group is unknown."""
    root = max((p.device_mesh for p in shards), key=lambda m: m.size())
    if root.size() != world_size():
        raise ValueError(
            f"the tensor-parallel parameters lie on a mesh of {root.size()} of the job's {world_size()} "
            "ranks, so the optimizer cannot tell how the other ranks relate to them: pass "
            "collectives=leantune.distributed.collectives.MeshCollectives(dp_group=...) with the "
            "data-parallel group over which gradients are averaged"
        )
    return MeshCollectives()


def _shard_axis(placement: Any, ndim: int) -> str | None:
    """Which axis of the ``(rows, cols)`` view a placement splits: ``"rows"``, ``"cols"`` or None."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    # FSDP2 over tensor parallelism strides dim 0 (_StridedShard, no Shard subclass in torch 2.13);
    # Replicate holds the whole tensor (Partial never describes a parameter)
    if not isinstance(placement, (Shard, _StridedShard)):
        return None
    return "cols" if ndim >= 2 and placement.dim in (ndim - 1, -1) else "rows"


def named_collectives(name: str) -> Collectives:
    """``"local"``, ``"replicated"`` or ``"sharded"`` (over the default process group)."""
    match name:
        case "local":
            return Collectives()
        case "replicated":
            return ReplicatedCollectives()
        case "sharded":
            return ShardedCollectives()
        case _:
            raise ValueError(
                f"Invalid collectives: {name!r} (use 'auto', 'local', 'replicated', 'sharded' or a "
                "leantune.optim.collectives.Collectives instance)"
            )


def _replicated_key(key: str) -> bool:
    # AdaLomo's column statistics are summed over the shards: the same on every rank.
    from leantune.optim.segments import split_segment_key

    return split_segment_key(key)[1] == "col"


class ReplicatedCollectives(Collectives):
    """Average full gradients over the data-parallel group inside the backward hooks."""

    replicated = True

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    def average_gradient(self, grad: Tensor) -> Tensor:
        # gloo has no AVG reduction: sum, then divide.
        dist.all_reduce(grad, group=self.group)
        return grad.div_(self.world_size)


class ShardedCollectives(Collectives):
    """Sum partial statistics over the shards of FSDP2 (DTensor, ``Shard(0)``) parameters."""

    sharded = True

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)

    def sum_square_norms(self, total: Tensor) -> Tensor:
        dist.all_reduce(total, group=self.group)
        return total

    def shard_sum(self, param: Tensor, partial: Tensor) -> Tensor:
        dist.all_reduce(partial, group=self.group)
        return partial

    def seed_offset(self) -> int:
        return 1_000_003 * self.rank

    def export_state(self, param: Tensor, key: str, value: Any, segment: Any = None) -> Any:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not isinstance(param, DTensor) or not torch.is_tensor(value) or value.dim() == 0:
            return value
        if segment is not None:
            return self._export_segment_state(param, key, value, segment)
        local = param.to_local()
        mesh = param.device_mesh
        if value.shape == local.shape:
            return DTensor.from_local(
                value, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
        if key == "row":  # one statistic per (flattened) row: sharded like the rows
            rows = param.numel() // param.shape[-1]
            return DTensor.from_local(value, mesh, [Shard(0)], run_check=False, shape=(rows,), stride=(1,))
        if key == "col":  # summed over all shards: identical everywhere
            return DTensor.from_local(value, mesh, [Replicate()], run_check=False)
        return value

    def import_state(self, param: Tensor, key: str, value: Any, segment: Any = None) -> Any:
        if segment is not None and hasattr(param, "device_mesh") and torch.is_tensor(value) and value.dim():
            full = value.to_local() if hasattr(value, "to_local") else value
            if _replicated_key(key):
                return full
            start = sum(segment.rank_rows[: self.rank])
            return full[start : start + segment.rank_rows[self.rank]]
        if hasattr(value, "to_local"):
            return value.to_local()
        return value

    def _export_segment_state(self, param: Tensor, key: str, value: Tensor, segment: Any) -> Any:
        """A segment's state as a replicated DTensor of the whole segment's state.

        A segment's rows are spread over the shards unevenly (a q block may lie on one rank only),
        which no ``Shard(0)`` layout describes; its state is small (row and column statistics, or
        the segment's moments), so it is gathered whole at save time and sliced again at load.
        """
        from torch.distributed.tensor import DTensor, Replicate

        mesh = param.device_mesh
        if not _replicated_key(key):
            counts = segment.rank_rows
            longest = max(counts)
            padded = value.new_zeros((longest, *value.shape[1:]))
            padded[: value.shape[0]] = value
            parts = [torch.empty_like(padded) for _ in counts]
            dist.all_gather(parts, padded.contiguous(), group=self.group)
            value = torch.cat([part[:n] for part, n in zip(parts, counts)])
        return DTensor.from_local(value, mesh, [Replicate()], run_check=False)


class MeshCollectives(Collectives):
    """Tensor parallelism (and its compositions) for the fused optimizers.

    Parameters are DTensors on a device mesh with one placement per mesh dimension (``Shard(0)``:
    rows, as ColwiseParallel and FSDP2 split a weight; ``Shard(1)``: columns, as RowwiseParallel
    does; ``Replicate()``), or plain tensors that every rank of the job holds alike (norms and
    embeddings outside the tensor-parallel plan, whose gradients tensor parallelism already makes
    equal on every rank).

    * A partial statistic is summed over the mesh dimensions that split the axis it was summed over
      (:meth:`shard_sum_over`): a row statistic over the column shards, a column statistic over the
      row shards, an RMS over every shard; never over a dimension that replicates the tensor.
    * The gradient norm: each rank's ``sum(g^2)`` of a tensor is weighted by the share of the
      ranks holding that same data (:meth:`norm_share`), then summed over ``norm_group`` (every
      rank of the job by default), so each element counts once.
    * ``dp_group``: data parallelism without sharding beside tensor parallelism; every gradient is
      averaged over it in the hook (ranks of one ``dp_group`` hold the same shards).
    * Stochastic rounding draws the same noise stream on every rank (offset 0): replicated tensors
      must round alike, and the streams stay in step because every rank updates every tensor with
      equal-sized shards (the tensor-parallel plan checks that the sizes divide).

    Args:
        dp_group: the data-parallel process group (``None``: no data parallelism beside the mesh,
            or FSDP2 on one of the mesh's dimensions, which the placements show).
        norm_group: the group over which the gradient norm is summed (``None``: the whole job).
        stages: pipeline stages among the ranks of ``norm_group`` (1: none): they hold disjoint
            parts of the model, which the norm sums; a tensor is replicated only within its stage.
    """

    sharded = True

    def __init__(
        self,
        dp_group: dist.ProcessGroup | None = None,
        norm_group: dist.ProcessGroup | None = None,
        stages: int = 1,
    ) -> None:
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.replicated = self.dp_size > 1
        self.norm_group = norm_group
        self.norm_size = dist.get_world_size(norm_group)
        # each stage holds its own ranks of the norm group (a tensor's copies are counted per stage)
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1 or self.norm_size % stages:
            raise ValueError(
                "stages must be a positive number of pipeline stages that divides the norm group's "
                f"{self.norm_size} ranks, got {stages!r}"
            )
        self.stages = stages
        self.spans_pipeline = stages > 1  # leantune.distributed.pipeline.pipeline_step accepts it

    def average_gradient(self, grad: Tensor) -> Tensor:
        dist.all_reduce(grad, group=self.dp_group)
        return grad.div_(self.dp_size)

    def sum_square_norms(self, total: Tensor) -> Tensor:
        dist.all_reduce(total, group=self.norm_group)
        return total

    def _dims(self, param: Tensor, axis: str) -> list[int]:
        if not hasattr(param, "device_mesh"):
            return []
        ndim = param.dim()
        return [
            i
            for i, pl in enumerate(param.placements)
            if (found := _shard_axis(pl, ndim)) is not None and (axis == "all" or found == axis)
        ]

    def shard_sum(self, param: Tensor, partial: Tensor) -> Tensor:
        return self.shard_sum_over(param, partial, "all")

    def shard_sum_over(self, param: Tensor, partial: Tensor, axis: str) -> Tensor:
        for i in self._dims(param, axis):
            dist.all_reduce(partial, group=param.device_mesh.get_group(i))
        return partial

    def norm_share(self, param: Tensor) -> float:
        pieces = 1
        if hasattr(param, "device_mesh"):
            for i in self._dims(param, "all"):
                pieces *= param.device_mesh.size(i)
        copies = self.norm_size // (pieces * self.stages)
        return 1.0 / copies if copies > 1 else 1.0

    def export_state(self, param: Tensor, key: str, value: Any, segment: Any = None) -> Any:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not isinstance(param, DTensor) or not torch.is_tensor(value) or value.dim() == 0:
            return value
        if segment is not None:
            raise ValueError("segments (half fine-tuning) are not supported on tensor-parallel parameters")
        mesh, ndim = param.device_mesh, param.dim()
        if value.shape == param.to_local().shape:
            return DTensor.from_local(
                value, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
        if ndim == 2 and key in ("row", "col"):  # AdaLomo's statistics: split like that axis
            axis, size = ("rows", param.shape[0]) if key == "row" else ("cols", param.shape[1])
            # a row shard keeps its own placement (FSDP2 over tensor parallelism strides dim 0)
            placements = [
                (pl if axis == "rows" else Shard(0)) if _shard_axis(pl, ndim) == axis else Replicate()
                for pl in param.placements
            ]
            return DTensor.from_local(value, mesh, placements, run_check=False, shape=(size,), stride=(1,))
        raise ValueError(
            f"optimizer state {key!r} of shape {tuple(value.shape)} has no tensor-parallel layout "
            f"(parameter {tuple(param.shape)}, local {tuple(param.to_local().shape)})"
        )
