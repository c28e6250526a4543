"""Reading local data files (JSONL / JSON / Parquet) through ``datasets``, with precise errors.

JSON arrays and Parquet files are read by the ``datasets`` library (local files only); JSON-lines
files are parsed line by line with ``json``, which keeps every value exactly as written (pyarrow
would coerce a column of mixed types). When a file is malformed, the error names the file and the
line (JSONL) or record, says what is wrong and how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["DataError", "is_saved_dataset", "load_records"]

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}



class DataError(ValueError):
    """Bad training or evaluation data (the message says where and how to fix it)."""


def _scan_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The (line number, record) pairs of a JSON-lines file; a DataError names a malformed line."""
    found = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({err.reason})") from None
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); each line "
                    "must be one JSON object"
                ) from None
            if not isinstance(value, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object per line, got {type(value).__name__}"
                )
            found.append((lineno, value))
    return found


def _is_json_lines(path: Path) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                return not raw.lstrip().startswith(b"[")
    return True


def load_records(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Read all records of a local data file.

    Returns:
        The records, and for each a location string for error messages (``file:line`` for JSONL,
        ``file record N`` otherwise).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: unsupported suffix, malformed content or no records.
    """
    p = Path(path)
    if p.is_dir() and is_saved_dataset(p):
        return _load_saved_dataset(p)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    builder = SUFFIXES.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; use .jsonl, .json or .parquet")
    if builder == "json" and not p.read_bytes().strip():
        raise DataError(f"{p}: the file has no records (it is empty)")
    json_lines = builder == "json" and _is_json_lines(p)
    if json_lines:
        # Parsed here, with file:line for every error, and exactly: through datasets (pyarrow), a
        # column of mixed types is coerced ("007" -> 7) and a bad value is blamed on the wrong line.
        found = _scan_jsonl(p)
        if not found:
            raise DataError(f"{p}: the file has no records (it is empty)")
        return [rec for _, rec in found], [f"{p}:{n}" for n, _ in found]
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True)
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(f"{p}: cannot be read as {builder}: {err}") from None
    records = ds.to_list()
    if not records:
        raise DataError(f"{p}: the file has no records (it is empty)")
    return records, [f"{p} record {i + 1}" for i in range(len(records))]


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``datasets`` ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    has = (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    return has or (path / "dataset_dict.json").is_file()


def _load_saved_dataset(p: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """A ``datasets.Dataset.save_to_disk`` directory (a ``DatasetDict``'s ``train`` split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p), keep_in_memory=True)
    except Exception as err:  # datasets raises several types for unreadable directories
        raise DataError(f"{p}: cannot be read as a saved dataset: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: a saved DatasetDict without a 'train' split (has {', '.join(ds)})")
        ds = ds["train"]
    records = ds.to_list()
    if not records:
        raise DataError(f"{p}: the saved dataset has no records")
    return records, [f"{p} record {i + 1}" for i in range(len(records))]
