"""Data: built-in tasks, local files, tokenization with loss masks, and batching."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leantune.data.encode import (
    IGNORE_INDEX,
    EncodeStats,
    PreferencePair,
    Sample,
    chat_prompt_ids,
    encode_preference,
    encode_records,
)
from leantune.data.formats import FORMATS, KINDS, prepare_records
from leantune.data.loader import BatchStream, collate, collate_pairs, eval_batches
from leantune.data.mixture import MixtureStream, expand_source
from leantune.data.packing import PackStats, pack_samples
from leantune.data.records import DataError, load_records
from leantune.data.tasks import TASK_WEIGHTS, TASKS, generate_examples, task_weights
from leantune.data.tokenizer import build_byte_tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "MixtureStream",
    "PackStats",
    "TASKS",
    "TASK_WEIGHTS",
    "BatchStream",
    "DataError",
    "Datasets",
    "EncodeStats",
    "FORMATS",
    "Sample",
    "build_byte_tokenizer",
    "build_datasets",
    "collate",
    "collate_pairs",
    "chat_prompt_ids",
    "encode_records",
    "encode_preference",
    "PreferencePair",
    "eval_batches",
    "generate_examples",
    "task_weights",
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
    sources: dict[str, list[Sample]] | None = None
    """The training samples of each ``data.train`` entry (``train`` is their concatenation)."""
    weights: list[float] | None = None
    """``data.weights`` when several sources are mixed by weight (else batches draw from ``train``)."""
    stream_paths: list[str] | None = None
    """The JSON-lines files to stream (``data.streaming``); ``train`` is then empty."""
    cache_note: str | None = None
    """Where the samples came from or went to in ``data.cache_dir``."""


def read_records(
    path: str, fmt: str = "auto", columns: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], list[str], str]:
    """The records of a local file in canonical form (:func:`leantune.data.formats.normalize`),
    their locations and their format (detected when ``fmt`` is ``"auto"``)."""
    records, where = load_records(path)
    records, fmt = prepare_records(records, where, fmt, columns)
    return records, where, fmt


def _split(records: list, where: list[str], n_eval: int, seed: int) -> tuple[list, list, list, list]:
    """(train records, train locations, eval records, eval locations): ``n_eval`` held out."""
    import random

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    keep = [i for i in range(len(records)) if i not in held]
    return ([records[i] for i in keep], [where[i] for i in keep],
            [records[i] for i in sorted(held)], [where[i] for i in sorted(held)])  # fmt: skip


def build_datasets(cfg: Any, tokenizer: Any) -> Datasets:
    """Train and eval samples for a :class:`leantune.config.DataConfig`, through the tokenised
    cache when ``data.cache_dir`` is set (see :mod:`leantune.data.cache`)."""
    if not cfg.cache_dir:
        return _build_datasets(cfg, tokenizer)
    from leantune.data.cache import cache_key, load_cached, save_cached

    specs = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    if _streams(cfg, [path for spec in specs for path in expand_source(spec)]):
        return _build_datasets(cfg, tokenizer)  # streamed data is tokenised as it is read
    key = cache_key(cfg, tokenizer)
    cached = load_cached(cfg.cache_dir, key)
    if cached is not None:
        cached.cache_note = f"read from the cache ({Path(cfg.cache_dir) / key}.*)"
        return cached
    data = _build_datasets(cfg, tokenizer)
    written = save_cached(cfg.cache_dir, key, data)
    data.cache_note = f"tokenised and cached ({written.with_suffix('')}.*)"
    return data


def _build_datasets(cfg: Any, tokenizer: Any) -> Datasets:
    """Train and eval samples for a :class:`leantune.config.DataConfig`.

    ``builtin`` generates the task families (evaluation prompts are drawn first and excluded from
    training); a file is read, validated and split (``num_eval`` held out) unless ``eval`` is given.
    Several sources (``data.train`` a list, or a directory of files) are each read in their own
    format and split in proportion to their size; ``data.weights`` sets how batches mix them.
    """
    opts = {"max_length": cfg.max_length, "overlong": cfg.overlong, "pack": cfg.pack is not False}
    specs = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    files = [(spec, path) for spec in specs for path in expand_source(spec)]
    if _streams(cfg, [path for _, path in files]):
        return _streaming_datasets(cfg, [path for _, path in files], tokenizer, opts)
    loaded = []  # (spec, format, records, locations, built-in eval records or None)
    for spec, path in files:
        if path == "builtin":
            eval_recs = generate_examples(cfg.tasks, cfg.num_eval, cfg.seed + 1, unique=True)
            banned = {r["prompt"] for r in eval_recs}
            weights = task_weights(cfg.tasks, cfg.task_weights)
            recs = generate_examples(cfg.tasks, cfg.num_train, cfg.seed, weights=weights, exclude=banned)
            where = [f"builtin train example {i}" for i in range(len(recs))]
            loaded.append((spec, "instruction", recs, where, eval_recs))
        else:
            recs, where, fmt = read_records(path, cfg.format, cfg.columns)
            loaded.append((spec, fmt, recs, where, None))
    total = sum(len(x[2]) for x in loaded if x[4] is None)
    train_parts: dict[str, list[Sample]] = {}
    eval_samples: list[Sample] = []
    stats: list[EncodeStats] = []
    eval_stats: list[EncodeStats] = []
    packs: list[PackStats] = []
    formats: dict[str, str] = {}
    if cfg.eval is not None:
        eval_recs, eval_where, eval_fmt = read_records(cfg.eval, cfg.format, cfg.columns)
        kinds = {KINDS[f] for _, f, *_ in loaded}
        if KINDS[eval_fmt] not in kinds:
            raise DataError(f"{cfg.eval}: format {eval_fmt} does not train like the training data's")
        eval_samples, st = encode_records(eval_recs, eval_where, eval_fmt, tokenizer, **opts)
        eval_stats.append(st)
    for spec, fmt, recs, where, builtin_eval in loaded:
        held: list = []
        held_where: list[str] = []
        if builtin_eval is not None:
            held, held_where = builtin_eval, [f"builtin eval example {i}" for i in range(len(builtin_eval))]
        elif cfg.eval is None:
            share = cfg.num_eval if len(loaded) == 1 else round(cfg.num_eval * len(recs) / max(1, total))
            recs, where, held, held_where = _split(recs, where, min(share, len(recs) // 10), cfg.seed)
        samples, st = encode_records(recs, where, fmt, tokenizer, **opts)
        stats.append(st)
        if cfg.pack is True and KINDS[fmt] in ("instruction", "chat"):
            samples, ps = pack_samples(samples, cfg.max_length, seed=cfg.seed)
            packs.append(ps)
        train_parts.setdefault(spec, []).extend(samples)
        formats.setdefault(spec, fmt)
        if held and cfg.eval is None:
            ev, est = _encode_eval(held, held_where, fmt, tokenizer, opts)
            eval_samples += ev
            eval_stats.append(est)
    train = [s for part in train_parts.values() for s in part]
    fmt_names = sorted(set(formats.values()))
    weights = None
    if cfg.weights is not None and len(specs) > 1:
        weights = [float(w) for w in cfg.weights]
    return Datasets(
        train=train,
        eval=eval_samples,
        format=fmt_names[0] if len(fmt_names) == 1 else "+".join(fmt_names),
        train_stats=_merge_stats(stats),
        eval_stats=_merge_stats(eval_stats) if eval_stats else None,
        pack_stats=_merge_packs(packs) if packs else None,
        sources={spec: part for spec, part in train_parts.items()},
        weights=weights,
    )


STREAM_ABOVE = 1 << 30  # data.streaming=null streams JSON-lines sources larger than this


def _streams(cfg: Any, paths: list[str]) -> bool:
    if cfg.streaming is False or "builtin" in paths:
        return False
    if cfg.streaming is None:
        return all(Path(p).is_file() and Path(p).suffix.lower() == ".jsonl" for p in paths) and (
            sum(Path(p).stat().st_size for p in paths) > STREAM_ABOVE
        )
    return True


def _streaming_datasets(cfg: Any, paths: list[str], tokenizer: Any, opts: dict) -> Datasets:
    """Nothing read but the held-out records: the trainer streams the rest."""
    from leantune.data.streaming import heldout_records

    for p in paths:
        if not Path(p).is_file() or Path(p).suffix.lower() != ".jsonl":
            raise DataError(f"{p}: data.streaming reads JSON-lines files (.jsonl) only")
    if cfg.weights is not None:
        raise DataError("data.weights mixes sources held in memory: set data.streaming=false to mix")
    n_eval = 0 if cfg.eval is not None else cfg.num_eval
    held, where = heldout_records(paths, n_eval)
    fmt = cfg.format
    if held:
        held, fmt = prepare_records(held, where, cfg.format, cfg.columns)
    if cfg.pack is True and KINDS.get(fmt, "") in ("instruction", "chat"):
        raise DataError(
            "data.pack=true packs instruction and chat data held in memory: set data.streaming=false"
        )
    eval_samples: list[Sample] = []
    eval_stats = None
    if cfg.eval is not None:
        eval_recs, eval_where, eval_fmt = read_records(cfg.eval, cfg.format, cfg.columns)
        eval_samples, eval_stats = encode_records(eval_recs, eval_where, eval_fmt, tokenizer, **opts)
    elif held:
        eval_samples, eval_stats = _encode_eval(held, where, fmt, tokenizer, opts)
    name = fmt if fmt != "auto" else "streamed"
    return Datasets([], eval_samples, name, EncodeStats(), eval_stats, stream_paths=paths)


def _encode_eval(records: list, where: list[str], fmt: str, tokenizer: Any, opts: dict) -> tuple:
    """Held-out samples, encoded like the training ones; a held-out share of text too short for one
    packed sequence is evaluated document by document instead."""
    try:
        return encode_records(records, where, fmt, tokenizer, **opts)
    except DataError:
        if KINDS[fmt] != "text" or not opts["pack"]:
            raise
        return encode_records(records, where, fmt, tokenizer, **{**opts, "pack": False})


def _merge_stats(parts: list[EncodeStats]) -> EncodeStats:
    out = EncodeStats()
    for p in parts:
        for name in ("records", "samples", "truncated", "dropped_overlong", "dropped_no_labels", "tokens",
                     "label_tokens"):  # fmt: skip
            setattr(out, name, getattr(out, name) + getattr(p, name))
        for k, v in p.extra.items():
            out.extra[k] = out.extra.get(k, 0) + v
    return out


def _merge_packs(parts: list[PackStats]) -> PackStats:
    return PackStats(sum(p.samples for p in parts), sum(p.rows for p in parts),
                     sum(p.tokens for p in parts), parts[0].max_length)  # fmt: skip
