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

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from leantune.optim.collectives import Collectives

__all__ = ["ReplicatedCollectives", "ShardedCollectives"]


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

    def export_state(self, param: Tensor, key: str, value: Any) -> Any:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not isinstance(param, DTensor) or not torch.is_tensor(value) or value.dim() == 0:
            return value
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

    def import_state(self, param: Tensor, key: str, value: Any) -> Any:
        if hasattr(value, "to_local"):
            return value.to_local()
        return value
