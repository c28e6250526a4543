"""Batches for training and evaluation: padding, and a resumable, rank-sharded data order.

The training order is a seeded permutation per epoch; its position (epoch, cursor) is part of the
checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have seen. With
several ranks each takes an equal, disjoint slice of every permutation (like DistributedSampler).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from leantune.data.encode import IGNORE_INDEX, PreferencePair, Sample
from leantune.data.records import DataError

__all__ = ["BatchStream", "collate", "collate_pairs", "eval_batches"]


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into ``input_ids``, ``attention_mask`` and ``labels``.

    Packed samples (with ``position_ids``) also get ``position_ids``; their padding is one more
    sequence of its own (positions from 0, no labels), so that the model needs no attention mask:
    ``attention_mask`` then only counts the real tokens, and the trainer does not pass it on.
    """
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    packed = any(s.position_ids is not None for s in samples)
    positions = torch.arange(length).repeat(len(samples), 1) if packed else None
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
        if positions is not None:
            positions[i, :n] = torch.tensor(s.position_ids if s.position_ids is not None else range(n))
            positions[i, n:] = torch.arange(length - n)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if positions is not None:
        out["position_ids"] = positions
    return out


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs as one batch for one forward: the ``B`` chosen sequences in rows ``0..B-1``,
    the rejected ones in rows ``B..2B-1`` (:func:`collate`)."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


class BatchStream:
    """An endless stream of training batches in a seeded, resumable order.

    Args:
        samples: the training samples.
        batch_size: samples per batch (per rank).
        pad_id: padding token id.
        seed: seed of the per-epoch permutations.
        rank, world_size: this rank's slice of each permutation.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = len(samples) // world_size // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{len(samples)} training samples cannot fill one batch of {batch_size} on each of "
                f"{world_size} rank(s); lower train.batch_size or add data"
            )
        self.epoch = 0
        self.cursor = 0  # batches already taken in this epoch
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(len(self.samples), generator=g).tolist()
            usable = len(perm) // self.world_size * self.world_size
            self._order = perm[:usable][self.rank :: self.world_size]
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.cursor >= self.batches_per_epoch:
            self.epoch += 1
            self.cursor = 0
            self._order = None
        order = self._epoch_order()
        idx = order[self.cursor * self.batch_size : (self.cursor + 1) * self.batch_size]
        self.cursor += 1
        return self._collate(idx)

    def _collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """The batch of the samples at ``idx`` (a subclass may batch other items)."""
        return collate([self.samples[i] for i in idx], self.pad_id)

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, fractional."""
        return self.epoch + self.cursor / self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.seed = int(state["seed"])
        self._order = None


def eval_batches(
    samples: Sequence[Sample], batch_size: int, pad_id: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches in a fixed order (this rank's share)."""
    mine = list(samples)[rank::world_size]
    for start in range(0, len(mine), batch_size):
        yield collate(mine[start : start + batch_size], pad_id)
