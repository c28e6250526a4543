"""Padding-free packing of instruction and chat samples: several samples per sequence, each
attending only to itself.

A packed row is the samples' tokens one after the other, with ``position_ids`` restarting at 0 for
each sample. Given position ids and no attention mask, transformers (``masking_utils``) finds the
sample boundaries where the positions restart and builds a block-diagonal causal mask for SDPA and
eager attention; FlashAttention takes the same boundaries as variable-length sequences. The label
of each sample's first token is masked, so no sample is trained to predict the next one; what is
left is the unpacked samples' targets, and the mean loss over a batch's targets is the one of the
same samples unpacked.

Rows are filled best-fit (each sample, in a seeded random order, goes into the fullest row it
fits), which leaves a few percent of padding for a realistic length spread instead of the half or
more of padding to the longest sample.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from leantune.data.encode import IGNORE_INDEX, Sample

__all__ = ["PackStats", "pack_samples", "packing_is_exact", "unpack_rows"]


@dataclass
class PackStats:
    samples: int
    rows: int
    tokens: int
    max_length: int

    @property
    def fill(self) -> float:
        """Tokens / (rows x max_length): the share of a full-length batch that is not padding."""
        return self.tokens / (self.rows * self.max_length) if self.rows else 0.0

    def summary(self) -> str:
        return (
            f"{self.samples} samples packed into {self.rows} sequences of {self.max_length} "
            f"({self.fill:.0%} filled)"
        )


def pack_row(samples: Sequence[Sample]) -> Sample:
    """One sequence of ``samples`` with restarting positions and each first label masked."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for s in samples:
        ids += s.input_ids
        labels += [IGNORE_INDEX, *s.labels[1:]]
        positions += range(len(s.input_ids))
    return Sample(ids, labels, position_ids=positions)


def pack_samples(
    samples: Sequence[Sample], max_length: int, *, seed: int = 0
) -> tuple[list[Sample], PackStats]:
    """Pack ``samples`` (each at most ``max_length`` tokens) into rows of at most ``max_length``.

    Deterministic for a ``seed``; every sample lands in exactly one row.

    Raises:
        ValueError: a sample longer than ``max_length``.
    """
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    # (free space, row) of the rows that are not full, sorted: the best fit is the first with room
    open_rows: list[tuple[int, int]] = []
    for i in order:
        n = len(samples[i].input_ids)
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={max_length}")
        at = bisect.bisect_left(open_rows, (n, -1))
        if at == len(open_rows):
            row, free = len(rows), max_length
            rows.append([])
        else:
            free, row = open_rows.pop(at)
        rows[row].append(i)
        if free - n > 0:
            bisect.insort(open_rows, (free - n, row))
    packed = [pack_row([samples[i] for i in row]) for row in rows]
    tokens = sum(len(s.input_ids) for s in samples)
    return packed, PackStats(len(samples), len(packed), tokens, max_length)


def unpack_rows(rows: Sequence[Sample]) -> list[Sample]:
    """The samples of packed ``rows`` again (cut where the positions restart), first labels as
    packed (masked: position 0 is never a target anyway)."""
    out = []
    for row in rows:
        if row.position_ids is None:
            out.append(row)
            continue
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        out += [Sample(row.input_ids[a:b], row.labels[a:b]) for a, b in zip(starts, starts[1:])]
    return out


def packing_is_exact(model: Any, device: Any, vocab_size: int) -> bool:
    """Whether ``model``'s code keeps packed samples apart: a row of two short random samples must
    give each sample's logits alone. Families whose code does not hand the position ids to its
    attention mask (OPT in transformers 5) see across samples and fail this."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab_size, (1, n), generator=g).to(device) for n in (5, 7))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0].float()
            alone = torch.cat([model(input_ids=x, use_cache=False).logits[0].float() for x in (a, b)])
    finally:
        model.train(was_training)
    # a leak moves logits by a sizeable part of their spread; kernels of another shape, by rounding
    return bool((packed - alone).abs().max() <= 1e-2 * alone.std().clamp_min(1e-6))
