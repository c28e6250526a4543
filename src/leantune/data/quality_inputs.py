"""The documents that ``leantune data score | classify | mix`` read: JSON-lines or Parquet files,
checked before any model is loaded, streamed document by document, and fingerprinted so that a
scores file can tell when its data file has changed.

A document is addressed by its ``line``: the line number in a JSON-lines file, the row number
(from 1) in a Parquet file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leantune.data.records import DataError

__all__ = [
    "check_readable",
    "check_unchanged",
    "count_documents",
    "input_fingerprint",
    "is_parquet",
    "iter_documents",
    "read_records",
]

_BATCH_ROWS = 1024  # Parquet rows read at a time


def is_parquet(path: str | Path) -> bool:
    """Whether ``path`` is named or starts like a Parquet file."""
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        return True
    try:
        with p.open("rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


def _parquet_file(p: Path, text_field: str | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{p}: not a readable Parquet file ({err})") from None
    if text_field is not None:
        schema = pf.schema_arrow
        if text_field not in schema.names:
            columns = ", ".join(schema.names)
            raise DataError(f"{p}: no column {text_field!r} (columns: {columns}); use --field")
        typ = schema.field(text_field).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise DataError(f"{p}: column {text_field!r} holds {typ}, not text")
    return pf


def check_readable(path: str | Path, text_field: str | None = None) -> Path:
    """``path`` as a readable JSON-lines or Parquet file (for Parquet, with a ``text_field`` column
    of strings when one is named).

    Raises:
        FileNotFoundError: it does not exist or is a directory.
        DataError: it cannot be opened, is a JSON array, or is a Parquet file without the text column.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise FileNotFoundError(f"{p}: a directory, not a JSON-lines or Parquet file")
    try:
        with p.open("rb") as fh:
            head = fh.read(4096)
    except OSError as err:
        raise DataError(f"{p}: cannot be read ({err.strerror or err})") from None
    if p.suffix.lower() == ".parquet" or head.startswith(b"PAR1"):
        _parquet_file(p, text_field)
    elif head.lstrip().startswith(b"["):
        raise DataError(
            f'{p}: a JSON array; only JSON-lines (one {{"text": ...}} object per line) or Parquet files '
            "can be scored"
        )
    return p


def _json_document(raw: bytes, text_field: str) -> tuple[str | None, str | None]:
    """``(text, None)`` or ``(None, reason)`` for one JSON line."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
    except json.JSONDecodeError as err:
        return None, f"malformed JSON ({err.msg} at column {err.colno})"
    if not isinstance(value, dict):
        return None, f"not a JSON object ({type(value).__name__})"
    if text_field not in value:
        return None, f"no {text_field!r} field"
    if not isinstance(value[text_field], str):
        return None, f"{text_field!r} is not a string ({type(value[text_field]).__name__})"
    if not value[text_field].strip():
        return None, "empty text"
    return value[text_field], None


def iter_documents(
    path: str | Path, text_field: str = "text"
) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line, text, None)`` per document, or ``(line, None, reason)`` for a line or row that holds
    none, in file order. Blank lines of a JSON-lines file are not documents and are not yielded."""
    p = Path(path)
    if is_parquet(p):
        pf = _parquet_file(p, text_field)
        row = 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    yield row, None, f"{text_field!r} is null"
                elif not text.strip():
                    yield row, None, "empty text"
                else:
                    yield row, text, None
        return
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if line:
                text, reason = _json_document(line, text_field)
                yield lineno, text, reason


def count_documents(path: str | Path) -> int:
    """Rows of a Parquet file, non-blank lines of a JSON-lines file (for a progress bar)."""
    if is_parquet(path):
        return _parquet_file(Path(path), None).metadata.num_rows
    total = 0
    with open(path, "rb") as fh:
        for line in fh:
            total += bool(line.strip())
    return total


def read_records(path: str | Path, wanted: set[int]) -> dict[int, dict[str, Any] | bytes]:
    """The ``wanted`` lines of a file: a Parquet row as a dict, a JSON line as its bytes (with a
    final ``\\n``) as they are in the file."""
    got: dict[int, dict[str, Any] | bytes] = {}
    if is_parquet(path):
        row = 0
        for batch in _parquet_file(Path(path), None).iter_batches(batch_size=_BATCH_ROWS):
            lo, row = row, row + batch.num_rows
            idx = [n - 1 - lo for n in wanted if lo < n <= row]
            if idx:
                for n, rec in zip(sorted(idx), batch.take(sorted(idx)).to_pylist()):
                    got[lo + n + 1] = rec
        return got
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno in wanted:
                got[lineno] = raw if raw.endswith(b"\n") else raw + b"\n"
    return got


def input_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a data file. The hash reads the file once: cheap next
    to scoring it, and unlike a modification time it survives a copy."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return {"size": Path(path).stat().st_size, "sha256": h.hexdigest()}


def check_unchanged(data: str | Path, scores: str | Path, meta: dict[str, Any] | None) -> bool:
    """Refuse a data file that changed since ``scores`` was made from it (rows address documents by
    line). Returns False when the scores file predates fingerprints and nothing could be checked.

    Raises:
        DataError: the size or the content hash differs from the one stored in ``meta``.
    """
    want = (meta or {}).get("input")
    if not want:
        return False
    size = Path(data).stat().st_size
    changed = (
        f"its size is {size} bytes, it was {want['size']}"
        if size != want["size"]
        else "its content hash differs"
        if input_fingerprint(data)["sha256"] != want["sha256"]
        else None
    )
    if changed:
        raise DataError(
            f"{data} changed since {scores} was made from it ({changed}): its rows would pick the wrong "
            f"documents; score it again (delete {Path(scores).name} first)"
        )
    return True
