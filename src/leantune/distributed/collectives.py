"""Collectives for the fused optimizers under data parallelism (DDP) and FSDP2 sharding.

* :class:`ReplicatedCollectives` (``dist.strategy=ddp``): each rank holds full weights and computes
  a full gradient per parameter; the hook averages it over the ranks before the update, so every
  replica applies the identical update (the peers' defect: without this, replicas drift apart).
* :class:`ShardedCollectives` (``dist.strategy=fsdp``): FSDP2 reduce-scatters gradients, so each
  rank updates its own rows of every parameter. Statistics that span the whole tensor (AdaLomo's
  column means, mean row statistic, update and weight RMS; the global gradient norm) are summed
  over the shards, which makes the update equal to a single process's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from leantune.optim.collectives import Collectives

__all__ = [
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

    # FSDP2 makes a mesh object per fully_shard call: equal meshes, not one object
    same_mesh = all(p.device_mesh == shards[0].device_mesh for p in shards)
    bad = [p for p in shards if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)]
    if bad:
        raise ValueError(
            f"fused optimizers support DTensor parameters sharded as FSDP2 does (Shard(0) on a 1-D "
            f"mesh); got {tuple(bad[0].placements)} on a {bad[0].device_mesh.ndim}-D mesh"
        )
    if plain or not same_mesh:
        raise ValueError(
            f"{plain} trainable parameters are plain tensors next to {len(shards)} FSDP2 shards"
            if plain
            else "the shards lie on different device meshes"
        )
    return ShardedCollectives(shards[0].device_mesh.get_group())


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
