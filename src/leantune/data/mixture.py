"""Several training sources with weights: which files a source means, and a resumable stream that
draws each batch's samples from the sources in the given proportions.

Each sample of a batch picks its source at random with probability ``weights[j]``; within a
source, samples follow a seeded permutation per pass over it (ranks take disjoint slices, as in
:class:`leantune.data.loader.BatchStream`). The choices of batch ``b`` come from a generator seeded
with ``(seed, rank, b)``, so the stream's state is just the batch count and each source's position:
both are in the checkpoint, and a resumed run draws exactly the batches the uninterrupted one would
have drawn. How many samples each source gave (the realised mixture) is reported.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from leantune.data.encode import Sample
from leantune.data.loader import collate
from leantune.data.records import SUFFIXES, DataError, is_saved_dataset

__all__ = ["MixtureStream", "expand_source"]


def expand_source(spec: str) -> list[str]:
    """The files (or saved dataset) one ``data.train`` entry stands for.

    Raises:
        DataError: a directory that cannot be listed or holds no supported file.
    """
    path = Path(spec)
    if spec == "builtin" or not path.is_dir() or is_saved_dataset(path):
        return [spec]
    try:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    except OSError as err:
        raise DataError(f"{spec}: cannot read the directory ({err.strerror or err})") from None
    if not files:
        raise DataError(f"{spec}: no .jsonl, .json or .parquet files in this directory")
    return [str(p) for p in files]


class MixtureStream:
    """An endless stream of batches mixing ``sources`` with probabilities ``weights``.

    Args:
        sources: (name, samples) per source.
        weights: non-negative, normalised here.
        batch_size, pad_id, seed, rank, world_size: as for :class:`BatchStream`.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str, Sequence[Sample]]],
        weights: Sequence[float],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.names = [n for n, _ in sources]
        self.samples = [list(s) for _, s in sources]
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        for name, samples, w in zip(self.names, self.samples, self.weights):
            if w > 0 and len(samples) < world_size:
                raise DataError(f"{name}: {len(samples)} samples cannot be shared by {world_size} rank(s)")
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size
        size = sum(len(s) for s in self.samples)
        self.batches_per_epoch = size // world_size // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{size} training samples cannot fill one batch of {batch_size} on each of "
                f"{world_size} rank(s); lower train.batch_size or add data"
            )
        self.batches = 0
        self.positions = [0] * len(self.samples)  # samples taken from each source on this rank
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _order(self, source: int, epoch: int) -> list[int]:
        key = (source, epoch)
        if key not in self._orders:
            n = len(self.samples[source])
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + source)
            perm = torch.randperm(n, generator=g).tolist()
            usable = n // self.world_size * self.world_size
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # one pass kept
            self._orders[key] = perm[:usable][self.rank :: self.world_size]
        return self._orders[key]

    def _take(self, source: int) -> Sample:
        per_rank = len(self.samples[source]) // self.world_size
        epoch, at = divmod(self.positions[source], per_rank)
        self.positions[source] += 1
        return self.samples[source][self._order(source, epoch)[at]]

    def next_batch(self) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}:{self.rank}:{self.batches}")
        picks = rng.choices(range(len(self.samples)), weights=self.weights, k=self.batch_size)
        self.batches += 1
        return collate([self._take(j) for j in picks], self.pad_id)

    @property
    def epoch_progress(self) -> float:
        """Passes over all samples' worth of batches (fractional)."""
        return self.batches / self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return int(self.epoch_progress)

    def realised(self) -> dict[str, float]:
        """The share of the samples drawn so far (this rank) that each source gave."""
        drawn = sum(self.positions) or 1
        return {n: p / drawn for n, p in zip(self.names, self.positions)}

    def describe(self) -> str:
        shares = self.realised()
        parts = [f"{n} {shares[n]:.1%} (target {w:.1%})" for n, w in zip(self.names, self.weights)]
        return f"data mixture over {sum(self.positions)} samples: " + ", ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "mixture", "batches": self.batches, "positions": list(self.positions),
                "names": list(self.names), "weights": list(self.weights), "seed": self.seed}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture" or state.get("names") != self.names:
            raise DataError(
                f"the checkpoint's data position is for sources {state.get('names', 'one source')}, "
                f"this run has {self.names}: resume with the same data.train"
            )
        self.batches = int(state["batches"])
        self.positions = [int(p) for p in state["positions"]]
        self.seed = int(state["seed"])
        self._orders = {}
