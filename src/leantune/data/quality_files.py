"""Scoring files of long documents: documents streamed from JSON lines or Parquet
(:mod:`leantune.data.quality_inputs`), their quality metrics (:mod:`leantune.data.quality`) written
to a scores file beside the input, resumably, by one process or by every rank of a torchrun job.

``docs.jsonl`` (or ``docs.parquet``) gets ``docs.scores.jsonl``: a first line ``{"_meta": {...}}``
(model, windows, text field, and the input's size and SHA-256), then one row per document line (a
JSON line that is not blank, or a Parquet row), ``{"line": N, "status": ...}``, in input order, with

* ``ok``: every metric;
* ``short``: shorter than one window: the statistical metrics, coherence ``null`` (NaN; JSON has
  no NaN) and ``chunks`` 0;
* ``skipped``: no metric, and a ``reason``: not UTF-8, malformed JSON, not an object, no text field,
  a text that is not a string, or an empty text.

An interrupted run is resumed by running the same command again: the rows already written are
kept (a torn last line is cut off) and their lines are not scored again.

Under torchrun (a process group initialised) the documents still to score are dealt out to the
ranks in blocks of ``group`` per rank; every rank scores its share, the rows are gathered, and rank
0 alone writes them, in input order. The model's forward sees the same windows whatever the number
of ranks, so with ``batch_size=1`` a file scored by N ranks equals the one scored by one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantune.data.quality import COHERENCE_KEYS, Windows, coherence_scores, text_metrics, token_metrics
from leantune.data.quality_inputs import check_readable, input_fingerprint, iter_documents
from leantune.data.records import DataError

__all__ = [
    "ScoreCounts",
    "check_readable",
    "iter_documents",
    "read_scores",
    "score_file",
    "score_keys",
    "scores_path",
]


def scores_path(path: str | Path) -> Path:
    """Where the scores of ``path`` go: ``docs.jsonl`` -> ``docs.scores.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.scores.jsonl")


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def read_scores(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The ``_meta`` header and the rows of a scores file (``null`` read back as NaN). A torn last
    line (an interrupted run) is left out."""
    meta, rows = None, []
    p = Path(path)
    lines = p.read_bytes().split(b"\n")
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i >= len(lines) - 2:  # the last record, cut short by an interruption
                break
            raise DataError(f"{p}:{i + 1}: not a scores row; delete the file to score again") from None
        if "_meta" in rec:
            meta = rec["_meta"]
        else:
            rows.append({k: (math.nan if v is None else v) for k, v in rec.items()})
    return meta, rows


@dataclass
class ScoreCounts:
    """What one file's scoring did."""

    scored: int = 0
    """Documents with every metric."""
    short: int = 0
    """Documents shorter than one window (coherence NaN)."""
    resumed: int = 0
    """Rows found from an earlier run and kept."""
    skipped: Counter = field(default_factory=Counter)
    """Lines without a document, by reason."""
    first_skips: list[str] = field(default_factory=list)
    """The first few skipped lines, as ``line N: reason``."""

    def summary(self) -> str:
        parts = [f"{self.scored} scored", f"{self.short} shorter than one window (coherence NaN)"]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.items())
            parts.append(f"{sum(self.skipped.values())} skipped ({reasons})")
        if self.resumed:
            parts.append(f"{self.resumed} kept from an earlier run")
        return ", ".join(parts)


def _resume(out: Path, meta: dict[str, Any]) -> set[int]:
    """The lines already scored in ``out``, after cutting a torn last line; checks the header."""
    if not out.exists():
        return set()
    old_meta, rows = read_scores(out)
    if old_meta is not None:
        for key in ("windows", "field", "model"):
            if old_meta.get(key) != meta[key]:
                raise DataError(
                    f"{out} was scored with {key} {old_meta.get(key)!r}, this run has {meta[key]!r}: "
                    "delete it to score again, or run with the same settings to resume"
                )
        if old_meta.get("input", meta["input"]) != meta["input"]:  # older files have no fingerprint
            raise DataError(f"the data file changed since {out} was started: delete it to score again")
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        out.write_bytes(data[: data.rfind(b"\n") + 1])  # drop the torn row; it is scored again
    return {int(r["line"]) for r in rows}


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_every_rank(value: Any, world: int) -> list[Any]:
    """``value`` from every rank, in rank order (one rank: ``[value]``)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _score_rows(
    docs: list[tuple[int, str]],
    model: Any,
    tokenizer: Any,
    windows: Windows,
    vocab: int | None,
    batch_size: int,
) -> list[dict[str, Any]]:
    """The rows of ``docs`` (``(line, text)``): text, token and coherence metrics."""
    if not docs:
        return []
    ids = tokenizer([t for _, t in docs], add_special_tokens=False)["input_ids"]
    if vocab is not None:
        top = max((max(x) for x in ids if x), default=-1)
        if top >= vocab:
            raise DataError(f"the tokenizer gives token id {top}, beyond the model's vocabulary of {vocab}")
    rows = []
    coherence = coherence_scores(model, ids, windows, batch_size=batch_size)
    for (lineno, text), tok, c in zip(docs, ids, coherence):
        row: dict[str, Any] = {"line": lineno, "status": "ok" if c["chunks"] else "short"}
        row.update(text_metrics(text))
        row.update(token_metrics(tok, len(text)))
        row.update(c)
        rows.append(_clean(row))
    return rows


def score_file(
    path: str | Path,
    model: Any,
    tokenizer: Any,
    windows: Windows,
    *,
    model_name: str,
    text_field: str = "text",
    batch_size: int = 4,
    group: int = 32,
    on_line: Callable[[int], None] | None = None,
) -> ScoreCounts:
    """Score every document of ``path`` into :func:`scores_path` (see the module docstring).

    Documents are tokenised ``group`` at a time (per rank) in one batched call of a fast tokenizer
    (which spreads a batch over threads), and their windows scored together, ``batch_size`` per
    forward. Under torchrun every rank must call this with the same arguments; the returned counts
    are the whole file's on every rank.

    Args:
        on_line: called with the number of input lines handled (progress), on rank 0 only.

    Raises:
        FileNotFoundError, DataError: an unreadable input, or a scores file from other settings or
            another version of the input (on every rank).
        RuntimeError: scoring failed on another rank.
    """
    from leantune.distributed.runtime import run_on_main

    src = check_readable(path, text_field)
    out = scores_path(src)
    rank, world = _rank_world()
    meta = {"model": model_name, "windows": [windows.long, windows.short, windows.eval], "field": text_field}

    def prepare() -> tuple[dict[str, Any], set[int]]:  # rank 0: it owns the scores file
        meta["input"] = input_fingerprint(src)
        return meta["input"], _resume(out, meta)

    meta["input"], done = run_on_main(prepare)
    counts = ScoreCounts(resumed=len(done))
    vocab = None
    if hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        vocab = model.get_input_embeddings().num_embeddings
    block: list[tuple[int, str | None, str | None]] = []  # (line, text, reason) in input order
    n_docs = 0

    def flush(fh: Any) -> None:
        docs = [(n, t) for n, t, reason in block if reason is None]
        try:  # an error is sent to every rank, which all raise it: none waits for the others
            mine: Any = _score_rows(docs[rank::world], model, tokenizer, windows, vocab, batch_size)
        except DataError as err:
            mine = ("DataError", str(err))
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            mine = ("RuntimeError", f"rank {rank}: {type(err).__name__}: {err}")
        parts = _on_every_rank(mine, world)
        for part in parts:
            if isinstance(part, tuple):
                raise (DataError if part[0] == "DataError" else RuntimeError)(part[1])
        scored = {r["line"]: r for part in parts for r in part}
        for lineno, _, reason in block:
            if reason is None:
                row = scored[lineno]
                counts.scored += row["status"] == "ok"
                counts.short += row["status"] == "short"
            else:
                row = {"line": lineno, "status": "skipped", "reason": reason}
                counts.skipped[reason.split(" (")[0]] += 1
                if len(counts.first_skips) < 5:
                    counts.first_skips.append(f"line {lineno}: {reason}")
            if fh is not None:
                fh.write(json.dumps(row) + "\n")
        if fh is not None:
            fh.flush()
        if on_line and rank == 0 and block:
            on_line(len(block))
        block.clear()

    fh = out.open("a", encoding="utf-8") if rank == 0 else None
    try:
        if fh is not None and out.stat().st_size == 0:
            fh.write(json.dumps({"_meta": meta}) + "\n")
        for lineno, text, reason in iter_documents(src, text_field):
            if lineno in done:
                if on_line and rank == 0:
                    on_line(1)
                continue
            block.append((lineno, text, reason))
            n_docs += reason is None
            if n_docs >= group * world:
                flush(fh)
                n_docs = 0
        flush(fh)
    finally:
        if fh is not None:
            fh.close()
    return counts


def score_keys() -> list[str]:
    """Every metric column of a scores row (for rule validation)."""
    return [*text_metrics("a b\nc").keys(), *token_metrics([1], 1).keys(), "chunks", *COHERENCE_KEYS]
