"""How a fused optimizer talks to other ranks: the seam between the update math and scale-out.

The base :class:`Collectives` is a single process: every method is the identity. The distributed
variants (:mod:`leantune.distributed.collectives`) average replicated gradients inside the backward
hooks (data parallel) or sum per-shard partial statistics (FSDP), so that updates equal those of a
single process on the same global batch.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["Collectives"]


class Collectives:
    """Single-process collectives (identity). Subclass for data parallelism or sharding.

    Attributes:
        replicated: gradients are full, per-rank tensors that must be averaged across ranks in the
            hook (data parallel without sharding).
        sharded: each rank holds a shard of every tensor, and updates run collectives across the
            shards (so every rank must update every tensor: none may skip one on its own).
    """

    replicated: bool = False
    sharded: bool = False

    def average_gradient(self, grad: Tensor) -> Tensor:
        """Average a replicated fp32 gradient over the data-parallel ranks (in place)."""
        return grad

    def sum_square_norms(self, total: Tensor) -> Tensor:
        """Sum the per-rank partial ``sum(g^2)`` of sharded gradients (in place)."""
        return total

    def shard_sum(self, param: Tensor, partial: Tensor) -> Tensor:
        """Sum ``partial`` (a statistic of this rank's shard of ``param``) over all its shards."""
        return partial

    def shard_sum_over(self, param: Tensor, partial: Tensor, axis: str) -> Tensor:
        """Sum ``partial`` over the shards that split ``param`` along ``axis`` (in place).

        ``axis`` says what ``partial`` was summed over on this rank: ``"rows"`` (e.g. a column
        statistic, a sum over the rows of the ``(prod(shape[:-1]), shape[-1])`` view), ``"cols"``
        (a row statistic) or ``"all"`` (a sum over every local element). Row-sharded layouts (FSDP2,
        and this default) never split columns, so ``"cols"`` is the identity and the others are
        :meth:`shard_sum`; tensor-parallel layouts also split columns.
        """
        return partial if axis == "cols" else self.shard_sum(param, partial)

    def norm_share(self, param: Tensor) -> float:
        """The weight of this rank's ``sum(g^2)`` of ``param`` in the global gradient norm: 1 when
        :meth:`sum_square_norms` sums distinct data, ``1/k`` for a tensor that ``k`` ranks of that
        sum hold identically (a replicated tensor beside tensor-parallel shards)."""
        return 1.0

    def seed_offset(self) -> int:
        """Added to the stochastic-rounding seed (shards differ per rank; replicas must not)."""
        return 0

    def export_state(self, param: Tensor, key: str, value: Any, segment: Any = None) -> Any:
        """Per-parameter state as it should appear in ``state_dict`` (e.g. a DTensor for a shard).

        ``segment`` is the :class:`~leantune.optim.segments.LocalSegment` the state belongs to, or
        ``None`` for the state of a whole tensor.
        """
        return value

    def import_state(self, param: Tensor, key: str, value: Any, segment: Any = None) -> Any:
        """Inverse of :meth:`export_state`: the local tensor the update works on."""
        if hasattr(value, "to_local"):
            return (
                value.full_tensor()
                if param is not None and not hasattr(param, "to_local")
                else value.to_local()
            )
        return value
