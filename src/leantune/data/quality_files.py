"""Scoring files of long documents: documents streamed from JSON lines, their quality metrics
(:mod:`leantune.data.quality`) written to a scores file beside the input, resumably.

``docs.jsonl`` gets ``docs.scores.jsonl``: a first line ``{"_meta": {...}}`` (model, windows,
text field), then one row per input line that is not blank, ``{"line": N, "status": ...}`` (keyed
by the line number, not in input order), with

* ``ok``: every metric;
* ``short``: shorter than one window: the statistical metrics, coherence ``null`` (NaN; JSON has
  no NaN) and ``chunks`` 0;
* ``skipped``: no metric, and a ``reason``: not UTF-8, malformed JSON, not an object, no text field,
  a text that is not a string, or an empty text.

An interrupted run is resumed by running the same command again: the rows already written are
kept (a torn last line is cut off) and their lines are not scored again.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantune.data.quality import COHERENCE_KEYS, Windows, coherence_scores, text_metrics, token_metrics
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


def check_readable(path: str | Path) -> Path:
    """``path`` as a readable JSON-lines file.

    Raises:
        FileNotFoundError: it does not exist or is a directory.
        DataError: it cannot be opened, or is a JSON array / Parquet file rather than JSON lines.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise FileNotFoundError(f"{p}: a directory, not a JSON-lines file")
    try:
        with p.open("rb") as fh:
            head = fh.read(4096).lstrip()
    except OSError as err:
        raise DataError(f"{p}: cannot be read ({err.strerror or err})") from None
    if p.suffix.lower() == ".parquet" or head.startswith((b"[", b"PAR1")):
        raise DataError(f'{p}: only JSON-lines files (one {{"text": ...}} object per line) can be scored')
    return p


def iter_documents(
    path: str | Path, text_field: str = "text"
) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text, None)`` per document of a JSON-lines file, or ``(line number, None,
    reason)`` for a line that holds none (blank lines are not documents and are not yielded)."""
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield lineno, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
                continue
            except json.JSONDecodeError as err:
                yield lineno, None, f"malformed JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(value, dict):
                yield lineno, None, f"not a JSON object ({type(value).__name__})"
            elif text_field not in value:
                yield lineno, None, f"no {text_field!r} field"
            elif not isinstance(value[text_field], str):
                yield lineno, None, f"{text_field!r} is not a string ({type(value[text_field]).__name__})"
            elif not value[text_field].strip():
                yield lineno, None, "empty text"
            else:
                yield lineno, value[text_field], None


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
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        out.write_bytes(data[: data.rfind(b"\n") + 1])  # drop the torn row; it is scored again
    return {int(r["line"]) for r in rows}


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

    Documents are tokenised ``group`` at a time in one batched call of a fast tokenizer (which
    spreads a batch over threads), and their windows scored together, ``batch_size`` per forward.

    Args:
        on_line: called with the number of input lines handled (progress).

    Raises:
        FileNotFoundError, DataError: an unreadable input, or a scores file from other settings.
    """
    src = check_readable(path)
    out = scores_path(src)
    meta = {"model": model_name, "windows": [windows.long, windows.short, windows.eval], "field": text_field}
    done = _resume(out, meta)
    counts = ScoreCounts(resumed=len(done))
    vocab = None
    if hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        vocab = model.get_input_embeddings().num_embeddings
    pending: list[tuple[int, str]] = []

    def flush(fh: Any) -> None:
        if not pending:
            return
        texts = [t for _, t in pending]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if vocab is not None:
            top = max((max(x) for x in ids if x), default=-1)
            if top >= vocab:
                raise DataError(
                    f"the tokenizer gives token id {top}, beyond the model's vocabulary of {vocab}"
                )
        coh = coherence_scores(model, ids, windows, batch_size=batch_size)
        for (lineno, text), tok, c in zip(pending, ids, coh):
            row: dict[str, Any] = {"line": lineno, "status": "ok" if c["chunks"] else "short"}
            row.update(text_metrics(text))
            row.update(token_metrics(tok, len(text)))
            row.update(c)
            counts.scored += row["status"] == "ok"
            counts.short += row["status"] == "short"
            fh.write(json.dumps(_clean(row)) + "\n")
        fh.flush()
        if on_line:
            on_line(len(pending))
        pending.clear()

    with out.open("a", encoding="utf-8") as fh:
        if not done and out.stat().st_size == 0:
            fh.write(json.dumps({"_meta": meta}) + "\n")
        for lineno, text, reason in iter_documents(src, text_field):
            if lineno in done:
                if on_line:
                    on_line(1)
                continue
            if reason is not None:
                counts.skipped[reason.split(" (")[0]] += 1
                if len(counts.first_skips) < 5:
                    counts.first_skips.append(f"line {lineno}: {reason}")
                # Skipped rows are written before the pending group's scores: rows are keyed by
                # line, not by position, so readers never depend on the order.
                fh.write(json.dumps({"line": lineno, "status": "skipped", "reason": reason}) + "\n")
                if on_line:
                    on_line(1)
                continue
            pending.append((lineno, text))
            if len(pending) >= group:
                flush(fh)
        flush(fh)
    return counts


def score_keys() -> list[str]:
    """Every metric column of a scores row (for rule validation)."""
    return [*text_metrics("a b\nc").keys(), *token_metrics([1], 1).keys(), "chunks", *COHERENCE_KEYS]
