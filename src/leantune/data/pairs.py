"""Preference pairs for the preference objectives: read, split, encoded, and streamed in batches.

A batch holds the ``B`` chosen sequences in rows ``0..B-1`` and the rejected ones in rows
``B..2B-1`` (:func:`leantune.data.collate_pairs`: one forward for both), plus ``pair_index``: each
pair's position in :attr:`PairData.pairs` (training pairs first, then the evaluation pairs), by
which precomputed reference log-probs are looked up.
"""

from __future__ import annotations

from typing import Any

import torch

from leantune.data import Datasets, _split, read_records
from leantune.data.encode import EncodeStats, PreferencePair, encode_preference
from leantune.data.loader import BatchStream, collate_pairs
from leantune.data.records import DataError

__all__ = ["PairStream", "build_pair_datasets", "dropped_pairs", "pair_batches", "read_pairs"]


def build_pair_datasets(cfg: Any, tokenizer: Any) -> Datasets:
    """Training and evaluation pairs of a :class:`leantune.config.DataConfig` whose ``train`` is a
    preference file (``data.eval`` another one, else ``num_eval`` pairs held out, at most a tenth).

    Raises:
        DataError: the file is not preference data, or no usable pair is left.
    """
    recs, where = _read(cfg.train, cfg, "a preference objective trains on prompt/chosen/rejected records")
    opts = {"max_length": cfg.max_length, "overlong": cfg.overlong}
    if cfg.eval is not None:
        eval_recs, eval_where = _read(cfg.eval, cfg, "data.eval must be preference data too")
    else:
        recs, where, eval_recs, eval_where = _split(recs, where, min(cfg.num_eval, len(recs) // 10), cfg.seed)
    train, stats = encode_preference(recs, where, tokenizer, **opts)
    evals: list[PreferencePair] = []
    eval_stats: EncodeStats | None = None
    if eval_recs:
        evals, eval_stats = encode_preference(eval_recs, eval_where, tokenizer, **opts)
    return Datasets(train=train, eval=evals, format="preference", train_stats=stats, eval_stats=eval_stats)  # type: ignore[arg-type]


def read_pairs(path: str, cfg: Any, tokenizer: Any) -> tuple[list[PreferencePair], EncodeStats]:
    """Every pair of one preference file, encoded with ``cfg``'s data settings (no split).

    Raises:
        DataError: the file is not preference data, or no usable pair is left.
    """
    recs, where = _read(path, cfg, "scoring needs prompt/chosen/rejected records")
    return encode_preference(recs, where, tokenizer, max_length=cfg.max_length, overlong=cfg.overlong)


def _read(path: str, cfg: Any, why: str) -> tuple[list[dict[str, Any]], list[str]]:
    recs, where, fmt = read_records(path, cfg.format, cfg.columns)
    if fmt != "preference":
        raise DataError(f"{path}: {fmt} records; {why}")
    return recs, where


def dropped_pairs(stats: EncodeStats) -> str | None:
    """What encoding dropped, e.g. ``"dropped 2 with an empty completion, 1 identical"``."""
    names = {
        "dropped_empty": "with an empty chosen or rejected completion",
        "dropped_identical": "with identical chosen and rejected completions",
        "dropped_no_completion": "with no completion token left after data.max_length",
        "dropped_overlong": "longer than data.max_length (data.overlong=drop)",
    }
    parts = [f"{stats.extra[k]} {text}" for k, text in names.items() if stats.extra.get(k)]
    if not parts:
        return None
    total = sum(stats.extra.get(k, 0) for k in names)
    return f"dropped {total} of {stats.records} pairs: " + "; ".join(parts)


def pair_batches(pairs: list[PreferencePair], batch_size: int, pad_id: int, offset: int = 0):
    """Every pair once, in order, in batches with their ``pair_index`` (``offset`` + position)."""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate_pairs(chunk, pad_id)
        batch["pair_index"] = torch.arange(offset + start, offset + start + len(chunk))
        yield batch


class PairStream(BatchStream):
    """An endless, seeded, resumable stream of batches of preference pairs (this rank's share of
    each epoch's permutation, as :class:`leantune.data.BatchStream` does for samples)."""

    def _collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = collate_pairs([self.samples[i] for i in idx], self.pad_id)  # type: ignore[misc]
        batch["pair_index"] = torch.tensor(idx, dtype=torch.long)
        return batch
