"""Data: built-in tasks, local files, tokenization with loss masks, and batching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leantune.data.encode import IGNORE_INDEX, EncodeStats, Sample, chat_prompt_ids, encode_records
from leantune.data.formats import FORMATS, KINDS, prepare_records
from leantune.data.loader import BatchStream, collate, eval_batches
from leantune.data.packing import PackStats, pack_samples
from leantune.data.records import DataError, load_records
from leantune.data.tasks import TASKS, generate_examples
from leantune.data.tokenizer import build_byte_tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "PackStats",
    "TASKS",
    "BatchStream",
    "DataError",
    "Datasets",
    "EncodeStats",
    "FORMATS",
    "Sample",
    "build_byte_tokenizer",
    "build_datasets",
    "collate",
    "chat_prompt_ids",
    "encode_records",
    "eval_batches",
    "generate_examples",
    "load_records",
    "load_tokenizer",
    "pack_samples",
    "read_records",
]


@dataclass
class Datasets:
    train: list[Sample]
    eval: list[Sample]
    format: str
    train_stats: EncodeStats
    eval_stats: EncodeStats | None
    pack_stats: PackStats | None = None
    """Set when instruction or chat samples were packed (``data.pack``); ``train`` holds the rows."""
    pack_refused: str | None = None
    """Why samples asked to be packed were not (the model's code does not keep them apart)."""


def read_records(
    path: str, fmt: str = "auto", columns: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], list[str], str]:
    """The records of a local file in canonical form (:func:`leantune.data.formats.normalize`),
    their locations and their format (detected when ``fmt`` is ``"auto"``)."""
    records, where = load_records(path)
    records, fmt = prepare_records(records, where, fmt, columns)
    return records, where, fmt


def build_datasets(cfg: Any, tokenizer: Any) -> Datasets:
    """Train and eval samples for a :class:`leantune.config.DataConfig`.

    ``builtin`` generates the task families (evaluation prompts are drawn first and excluded from
    training); a file is read, validated and split (``num_eval`` held out) unless ``eval`` is given.
    """
    opts = {"max_length": cfg.max_length, "overlong": cfg.overlong, "pack": cfg.pack is not False}
    if cfg.train == "builtin":
        eval_recs = generate_examples(cfg.tasks, cfg.num_eval, cfg.seed + 1, unique=True)
        train_recs = generate_examples(
            cfg.tasks, cfg.num_train, cfg.seed, exclude={r["prompt"] for r in eval_recs}
        )
        fmt = "instruction"
        train_where = [f"builtin train example {i}" for i in range(len(train_recs))]
        eval_where = [f"builtin eval example {i}" for i in range(len(eval_recs))]
    else:
        train_recs, train_where, fmt = read_records(cfg.train, cfg.format, cfg.columns)
        if cfg.eval is not None:
            eval_recs, eval_where, eval_fmt = read_records(cfg.eval, cfg.format, cfg.columns)
            if KINDS[eval_fmt] != KINDS[fmt]:
                raise DataError(
                    f"{cfg.eval}: format {eval_fmt} does not train like the training data's ({fmt})"
                )
        else:
            n_eval = min(cfg.num_eval, len(train_recs) // 10)
            import random

            order = list(range(len(train_recs)))
            random.Random(cfg.seed).shuffle(order)
            held = set(order[:n_eval])
            eval_recs = [train_recs[i] for i in sorted(held)]
            eval_where = [train_where[i] for i in sorted(held)]
            train_recs = [r for i, r in enumerate(train_recs) if i not in held]
            train_where = [w for i, w in enumerate(train_where) if i not in held]
    train, train_stats = encode_records(train_recs, train_where, fmt, tokenizer, **opts)
    pack_stats = None
    if cfg.pack is True and KINDS[fmt] in ("instruction", "chat"):
        train, pack_stats = pack_samples(train, cfg.max_length, seed=cfg.seed)
    eval_samples: list[Sample] = []  # unpacked: evaluation generates from each prompt
    eval_stats = None
    if eval_recs:
        eval_samples, eval_stats = encode_records(eval_recs, eval_where, fmt, tokenizer, **opts)
    return Datasets(train, eval_samples, fmt, train_stats, eval_stats, pack_stats)
