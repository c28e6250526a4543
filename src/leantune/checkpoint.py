"""Crash-safe checkpoints: atomic directories with a verified manifest, exact-resume state.

A checkpoint is a directory written under a temporary name, every file fsynced, a
``manifest.json`` (sizes + SHA-256 of every file) written last, then renamed into place. A
directory without a valid manifest is never used: loading verifies it and falls back to the
previous good checkpoint with a warning. Pruning keeps the last ``K`` and never deletes the newest
valid one.

Layout of ``RUN_DIR/checkpoints/step-000120/``::

    model/              Hugging Face format: config.json, model.safetensors, tokenizer files
    optim/              optimizer state (torch.distributed.checkpoint, keyed by parameter name)
    training_state.pt   scheduler, data position, RNG and engine states, counters
    trainer_state.json  step counters and metrics (human readable)
    manifest.json       sizes and checksums of all of the above

Only safetensors files hold weights; ``training_state.pt`` is read with
``torch.load(weights_only=True)``, and DCP's metadata pickle and non-tensor values are checked
against allow-lists before DCP reads them, so a tampered checkpoint cannot run code.

A failed write (e.g. a full disk) raises :class:`CheckpointWriteError` naming the file; the
temporary directory is removed and existing checkpoints are untouched. Temporary directories of
killed writers are removed by the next write of the same target or by pruning.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "atomic_directory",
    "capture_rng",
    "find_checkpoints",
    "is_shard",
    "is_sharded",
    "latest_valid_checkpoint",
    "prune_checkpoints",
    "restore_rng",
    "verify_checkpoint",
    "write_manifest",
    "write_text_atomic",
]

MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed on the storage side (e.g. the disk is full). The partial write
    was removed; existing checkpoints are untouched.

    Attributes:
        target: the directory that was being written.
        file: the file being written when it failed (relative to ``target``), if known.
        disk_full: the failure looks like a full disk or an exhausted quota.
    """

    def __init__(self, message: str, *, target: Path, file: str | None, disk_full: bool) -> None:
        super().__init__(message)
        self.target, self.file, self.disk_full = target, file, disk_full


def _short(err: BaseException) -> str:
    # torch.distributed.checkpoint wraps each rank's failure (a BaseException with .failures).
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def _is_storage_error(err: BaseException) -> bool:
    return isinstance(err, OSError) or type(err).__name__ in ("SafetensorError", "CheckpointException")


def _describe_write_failure(target: Path, tmp: Path, err: BaseException) -> CheckpointWriteError | None:
    """A :class:`CheckpointWriteError` for a storage failure (inspects ``tmp`` before it is removed),
    or None for other errors (a bug, a bad model...), which are re-raised as they are."""
    import errno

    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(_short(c) for c in chain)
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        free = -1
    disk_full = (
        any(getattr(c, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for c in chain)
        or "No space left" in text
        or "os error 28" in text
        or 0 <= free < (1 << 20)  # torch's zip writer reports ENOSPC as "unexpected pos ..."
    )
    if not (disk_full or any(_is_storage_error(c) for c in chain)):
        return None
    files = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
    name = getattr(err, "filename", None)
    last = max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    file = str(last.relative_to(tmp)) if last is not None else (str(name) if name else None)
    why = f"the disk is full ({free / 2**20:.1f} MiB free)" if disk_full else "a storage error"
    return CheckpointWriteError(
        f"could not write {target}: {why} while writing {file or 'it'} ({_short(err)}). The partial "
        "write was removed; earlier checkpoints are untouched",
        target=target,
        file=file,
        disk_full=disk_full,
    )


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


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (every rank must call this)."""
    dist = _dist()
    if dist is None:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return flag.item() == 0


def atomic_directory(target: Path, write: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Path:
    """Create ``target`` atomically: ``write(tmp)`` fills a temporary sibling, then a manifest is
    written and the directory renamed into place. On any error the temporary directory is removed
    and ``target`` (if it existed) is untouched.

    Under ``torch.distributed`` every rank calls this with the same ``target``: all ranks run
    ``write`` into one shared temporary directory (e.g. for sharded checkpoints), rank 0 writes
    the manifest and renames, and a failure on any rank fails the save on every rank.
    """
    target = Path(target)
    dist = _dist()
    main = dist is None or dist.get_rank() == 0
    tag = os.getpid() if dist is None else "dist"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    error: BaseException | None = None
    if main:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            for leftover in target.parent.glob(f".{target.name}.tmp-*"):  # e.g. a killed export
                if leftover == tmp or _is_stale(leftover):
                    shutil.rmtree(leftover)
            tmp.mkdir()
        except OSError as err:
            error = err
    if not _all_ok(error is None):
        raise error or CheckpointError(f"{target}: another rank could not prepare the checkpoint directory")
    try:
        write(tmp)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # reported on every rank below (DCP's CheckpointException is no Exception)
        error = err
    if main and _all_ok(error is None):
        try:
            write_manifest(tmp, meta)
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
            _fsync_dir(target.parent)
        except BaseException as err:
            error = err
    elif not main:
        _all_ok(error is None)
    failure = None
    if error is not None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
        failure = _describe_write_failure(target, tmp, error)  # before the partial write goes
    if not _all_ok(error is None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from error
        raise error or CheckpointError(f"{target}: the save failed on another rank")
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
        if _is_stale(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    return deleted


def _is_stale(leftover: Path) -> bool:
    """A temporary directory of a write that can no longer finish (its process is gone)."""
    pid = leftover.name.rsplit("-", 1)[-1]
    return not (pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a crash leaves either the old or the new file whole."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):  # of a writer killed before its rename
        if _is_stale(leftover):
            leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_unsafe(path, err)) from None


def _unsafe(path: Any, err: BaseException) -> str:
    return (
        f"{path}: refusing to load it: it holds objects other than tensors and plain containers, which "
        "leantune never writes (a pickle can run code when loaded; was the checkpoint tampered with?) "
        f"[{_short(err)[:200]}]"
    )


# ------------------------------------------------------------------ model and optimizer state


def is_shard(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor: an FSDP2 shard of a parameter (or a view of one)."""
    return hasattr(t, "device_mesh")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards."""
    return any(is_shard(p) for p in model.parameters())


def save_model(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """Hugging Face format (safetensors + config + tokenizer), written by rank 0.

    Sharded (FSDP2) models are gathered to a full, CPU state dict first; every rank must call this.
    """
    dist = _dist()
    state = None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # A tied head appears under both names there; the HF file keeps one, as save_pretrained
        # does for an unsharded model (transformers re-ties them on load).
        for alias in _tied_aliases(model):
            state.pop(alias, None)
    if dist is None or dist.get_rank() == 0:
        model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(directory)


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (a head tied to the embeddings)."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files of a directory."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load HF safetensors weights into ``model`` (plain, DDP-replicated or FSDP2-sharded)."""
    tied = _tied_aliases(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        dist = _dist()
        state = read_safetensors_dir(directory) if dist.get_rank() == 0 else {}
        set_model_state_dict(
            model,
            state,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
        )
        return
    state = read_safetensors_dir(directory)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - tied:
        raise CheckpointError(
            f"{directory}: weights do not match the model (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )


@contextmanager
def _single_process_is_fine() -> Iterator[None]:
    # DCP warns when it runs without a process group; one process is a supported case here.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Optimizer state with ``torch.distributed.checkpoint``, keyed by parameter name, sharded
    like the parameters: a checkpoint written by N ranks loads on M ranks. Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    init = getattr(optimizer, "init_state", None)
    if init is not None:
        init()  # every trainable tensor has state, so that a loader finds every key it expects
    with _single_process_is_fine():
        dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Inverse of :func:`save_optimizer` (any number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    init = getattr(optimizer, "init_state", None)
    if init is not None:
        init()  # DCP fills an existing structure; fused optimizers create theirs lazily otherwise
    osd = get_optimizer_state_dict(model, optimizer)
    reader, planner = _safe_dcp(directory)
    try:
        with _single_process_is_fine():
            dcp.load({"optim": osd}, storage_reader=reader, planner=planner)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_unsafe(directory, err)) from None
    except BaseException as err:
        if type(err).__name__ != "CheckpointException":
            raise
        refused = ("UnpicklingError", "Weights only load failed", "not allowed in checkpoint metadata")
        if any(text in f"{_short(err)} {err}" for text in refused):
            raise CheckpointError(_unsafe(directory, err)) from None
        raise CheckpointError(f"{directory}: cannot load the optimizer state ({_short(err)})") from None
    set_optimizer_state_dict(model, optimizer, osd)


# DCP reads ``.metadata`` with plain ``pickle.load`` and non-tensor values with
# ``torch.load(weights_only=False)``; a tampered checkpoint could run code on resume. These classes
# are what DCP's metadata holds, besides the classes of ``torch.distributed.checkpoint.metadata``.
_DCP_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch.distributed.checkpoint.metadata as md

        obj = getattr(md, name, None) if module == md.__name__ else None
        if isinstance(obj, type) and obj.__module__ == md.__name__:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _safe_dcp(directory: Path) -> tuple[Any, Any]:
    """A DCP storage reader and load planner that refuse anything but checkpoint data: the metadata
    pickle is checked against an allow-list first, non-tensor values with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = getattr(self, "_get_metadata_path", None)
            path = path(kwargs.get("rank")) if path else Path(self.path) / ".metadata"
            with open(path, "rb") as fh:
                _MetadataUnpickler(fh).load()  # raises before DCP's own pickle.load could run code
            return super().read_metadata(*args, **kwargs)

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            # What loads with weights_only=True holds only allow-listed types, so DCP's own
            # (unrestricted) load of the same bytes runs nothing else.
            torch.load(value, map_location="cpu", weights_only=True)
            value.seek(0)
            super().load_bytes(read_item, value)

    return Reader(str(directory)), Planner()
