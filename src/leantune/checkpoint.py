"""Crash-safe checkpoints: atomic directories with a verified manifest, exact-resume state.

A checkpoint is a directory written under a temporary name, every file fsynced, a
``manifest.json`` (sizes + SHA-256 of every file) written last, then renamed into place. A
directory without a valid manifest is never used: loading verifies it and falls back to the
previous good checkpoint with a warning. Pruning keeps the last ``K`` and never deletes the newest
valid one.

Layout of ``RUN_DIR/checkpoints/step-000120/``::

    model/              Hugging Face format: config.json, model.safetensors, tokenizer files
    optimizer.pt        optimizer (or stepper) state_dict: statistics, scaler, accumulation, RNG
    training_state.pt   scheduler, data position, RNG states (python, torch, cuda)
    trainer_state.json  step counters and metrics (human readable)
    manifest.json       sizes and checksums of all of the above

Only safetensors files hold weights; ``.pt`` files hold optimizer/trainer state and are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "atomic_directory",
    "capture_rng",
    "find_checkpoints",
    "latest_valid_checkpoint",
    "prune_checkpoints",
    "restore_rng",
    "verify_checkpoint",
    "write_manifest",
]

MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def write_manifest(directory: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fsync every file under ``directory`` and write ``manifest.json`` with sizes and SHA-256."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync_file(path)
        files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"version": 1, "files": files, "meta": meta or {}}
    target = directory / MANIFEST
    with target.open("w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    for sub in {p.parent for p in directory.rglob("*")} | {directory}:
        _fsync_dir(sub)
    return manifest


def verify_checkpoint(directory: Path, *, checksums: bool = True) -> None:
    """Raise :class:`CheckpointError` unless every file of the manifest is present and intact."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no manifest.json (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory}: unreadable manifest.json ({err})") from None
    for rel, info in files.items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{directory}: {rel} is missing")
        if path.stat().st_size != info["size"]:
            raise CheckpointError(
                f"{directory}: {rel} has {path.stat().st_size} bytes, expected {info['size']}"
            )
        if checksums and _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{directory}: {rel} is corrupt (checksum mismatch)")


def atomic_directory(target: Path, write: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Path:
    """Create ``target`` atomically: ``write(tmp)`` fills a temporary sibling, then a manifest is
    written and the directory renamed into place. On any error the temporary directory is removed
    and ``target`` (if it existed) is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        write(tmp)
        write_manifest(tmp, meta)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return -1


def find_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories under ``ckpt_root``, oldest first (temporary ones excluded)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and _step_of(p) >= 0]
    return sorted(found, key=_step_of)


def latest_valid_checkpoint(ckpt_root: Path, *, checksums: bool = True) -> Path | None:
    """The newest checkpoint that verifies; warns about each newer one that does not."""
    for path in reversed(find_checkpoints(ckpt_root)):
        try:
            verify_checkpoint(path, checksums=checksums)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint: {err}; falling back to an earlier one", stacklevel=2)
    return None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, never the newest *valid* one, and
    remove leftovers of interrupted writes. Returns the deleted paths."""
    all_ckpts = find_checkpoints(ckpt_root)
    newest_valid = latest_valid_checkpoint(ckpt_root, checksums=False)
    keep = set(all_ckpts[-keep_last:])
    if newest_valid is not None:
        keep.add(newest_valid)
    deleted = []
    for path in all_ckpts:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    for leftover in ckpt_root.glob(f".{PREFIX}*.tmp-*") if ckpt_root.is_dir() else []:
        pid = leftover.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()):
            shutil.rmtree(leftover, ignore_errors=True)
    return deleted


def capture_rng() -> dict[str, Any]:
    """Random states of python, torch (CPU) and CUDA, for exact resume."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (never arbitrary pickles)."""
    return torch.load(path, map_location="cpu", weights_only=True)
