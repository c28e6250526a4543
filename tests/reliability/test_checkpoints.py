"""Atomic checkpoints: temporary directory, fsync, rename, manifest with sizes and checksums;
loading verifies and falls back to the previous good checkpoint with a warning; keep-last-K never
deletes the only good one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from leantune import checkpoint as ckpt
from leantune.config import load_config
from leantune.trainer import Trainer
from tests.helpers import stop_at
from tests.reliability.common import assert_same_weights, losses, run_args


def _write_files(files):
    def write(tmp):
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)

    return write


FILES = {"model/model.safetensors": b"w" * 1000, "optim/.metadata": b"m" * 10, "training_state.pt": b"t" * 99}


def test_written_in_a_temporary_directory_fsynced_then_renamed(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "step-000005"
    synced_files, synced_dirs, seen = [], [], {}
    monkeypatch.setattr(ckpt, "_fsync_file", lambda p: synced_files.append(p.name))
    real_dir = ckpt._fsync_dir
    monkeypatch.setattr(ckpt, "_fsync_dir", lambda p: (synced_dirs.append(p), real_dir(p)))

    def write(tmp):
        seen["tmp"] = tmp.name
        seen["target existed"] = target.exists()
        _write_files(FILES)(tmp)

    assert ckpt.atomic_directory(target, write, meta={"step": 5}) == target
    assert seen == {"tmp": f".step-000005.tmp-{os.getpid()}", "target existed": False}
    assert sorted(synced_files) == sorted(p.rsplit("/", 1)[-1] for p in FILES)  # every file, before
    assert target.parent in synced_dirs  # the rename itself is made durable
    manifest = json.loads((target / ckpt.MANIFEST).read_text())
    assert manifest["meta"] == {"step": 5}
    assert manifest["files"] == {
        rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in FILES.items()
    }
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-000005"]


def test_a_failed_write_leaves_the_old_directory_untouched_and_no_temporary(tmp_path):
    target = tmp_path / "final"
    ckpt.atomic_directory(target, _write_files({"a": b"old"}))

    def fails(tmp):
        (tmp / "a").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.atomic_directory(target, fails)
    assert (target / "a").read_bytes() == b"old"
    ckpt.verify_checkpoint(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_target_several_missing_directories_deep_is_created(tmp_path):
    target = tmp_path / "runs" / "a" / "checkpoints" / "step-000001"
    ckpt.atomic_directory(target, _write_files({"a": b"x"}))
    assert (target / "a").read_bytes() == b"x"
    ckpt.verify_checkpoint(target)


def test_an_existing_target_is_replaced_whole_and_the_old_copy_removed(tmp_path):
    target = tmp_path / "final"
    ckpt.atomic_directory(target, _write_files({"a": b"old", "only-old": b"o"}))
    ckpt.atomic_directory(target, _write_files({"a": b"new"}))
    assert sorted(p.name for p in target.iterdir()) == sorted(["a", ckpt.MANIFEST])
    assert (target / "a").read_bytes() == b"new"
    ckpt.verify_checkpoint(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no .final.old-<pid> left


def test_a_leftover_of_this_process_is_replaced_and_a_live_writers_is_kept(tmp_path):
    target = tmp_path / "final"
    mine = tmp_path / f".final.tmp-{os.getpid()}"  # e.g. an export this process was interrupted in
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "half").write_bytes(b"h")
    live = tmp_path / f".final.tmp-{os.getppid()}"  # another writer that is still running
    live.mkdir()
    ckpt.atomic_directory(target, _write_files({"a": b"x"}))
    assert sorted(p.name for p in target.iterdir()) == sorted(["a", ckpt.MANIFEST])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["final", live.name])


@pytest.mark.parametrize("stage", ["manifest", "rename"])
def test_a_failure_after_the_write_is_raised_and_leaves_the_old_target(tmp_path, monkeypatch, stage):
    target = tmp_path / "final"
    ckpt.atomic_directory(target, _write_files({"a": b"old"}))

    def boom(*args, **kwargs):
        raise RuntimeError(f"{stage} failed")

    if stage == "manifest":
        monkeypatch.setattr(ckpt, "write_manifest", boom)
    else:
        monkeypatch.setattr(ckpt, "_fsync_dir", boom)  # after the rename: the save is not durable
    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        ckpt.atomic_directory(target, _write_files({"a": b"new"}))
    if stage == "manifest":
        assert (target / "a").read_bytes() == b"old"
        ckpt.verify_checkpoint(target)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _rmtree_failing_on(monkeypatch, marker):
    """shutil.rmtree that cannot remove directories named with ``marker`` (e.g. a busy NFS file)."""
    real = ckpt.shutil.rmtree

    def rmtree(path, ignore_errors=False, **kwargs):
        if marker in str(path):
            if ignore_errors:
                return
            raise OSError(16, "Device or resource busy", str(path))
        return real(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)


def test_an_old_copy_that_cannot_be_removed_does_not_fail_the_save(tmp_path, monkeypatch):
    target = tmp_path / "final"
    ckpt.atomic_directory(target, _write_files({"a": b"old"}))
    _rmtree_failing_on(monkeypatch, ".old-")
    ckpt.atomic_directory(target, _write_files({"a": b"new"}))
    assert (target / "a").read_bytes() == b"new"


def test_a_temporary_that_cannot_be_removed_does_not_hide_the_error(tmp_path, monkeypatch):
    _rmtree_failing_on(monkeypatch, ".tmp-")

    def fails(tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.atomic_directory(tmp_path / "final", fails)


def _corrupt_missing_manifest(d):
    (d / ckpt.MANIFEST).unlink()


def _corrupt_bad_manifest(d):
    (d / ckpt.MANIFEST).write_text("{not json")


def _corrupt_missing_file(d):
    (d / "training_state.pt").unlink()


def _corrupt_truncated(d):
    with open(d / "model" / "model.safetensors", "r+b") as fh:
        fh.truncate(500)


def _corrupt_flipped_byte(d):
    path = d / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[123] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "no manifest": (_corrupt_missing_manifest, r"no manifest\.json \(the write did not finish\)"),
    "unreadable manifest": (_corrupt_bad_manifest, r"unreadable manifest\.json"),
    "missing file": (_corrupt_missing_file, r"training_state\.pt is missing"),
    "truncated file": (_corrupt_truncated, r"model/model\.safetensors has 500 bytes, expected 1000"),
    "flipped byte": (_corrupt_flipped_byte, r"model/model\.safetensors is corrupt \(checksum mismatch\)"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_verification_catches_it_and_loading_falls_back_with_a_warning(case, tmp_path):
    corrupt, message = CORRUPTIONS[case]
    root = tmp_path / "checkpoints"
    for step in (3, 6):
        ckpt.atomic_directory(root / f"step-{step:06d}", _write_files(FILES))
    corrupt(root / "step-000006")
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.verify_checkpoint(root / "step-000006")
    with pytest.warns(UserWarning, match=rf"skipping checkpoint: .*step-000006: {message}.*; falling back"):
        assert ckpt.latest_valid_checkpoint(root) == root / "step-000003"


def test_keep_last_never_deletes_the_only_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        ckpt.atomic_directory(root / f"step-{step:06d}", _write_files(FILES))
    _corrupt_truncated(root / "step-000009")
    (root / "step-000012").mkdir()  # a checkpoint directory without a manifest
    with pytest.warns(UserWarning):
        deleted = ckpt.prune_checkpoints(root, keep_last=1)
    assert [p.name for p in deleted] == ["step-000003", "step-000009"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000012"]
    with pytest.warns(UserWarning, match="step-000012"):
        assert ckpt.latest_valid_checkpoint(root) == root / "step-000006"
    # normal pruning: the newest K, oldest first to go
    for step in (15, 18):
        ckpt.atomic_directory(root / f"step-{step:06d}", _write_files(FILES))
    ckpt.prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000015", "step-000018"]


def test_pruning_removes_leftovers_of_dead_writers_only(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.atomic_directory(root / "step-000003", _write_files(FILES))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (int(dead.stdout), live.pid):
            (root / f".step-000006.tmp-{pid}").mkdir()
        ckpt.prune_checkpoints(root, keep_last=2)
        names = sorted(p.name for p in root.iterdir())
        assert names == [f".step-000006.tmp-{live.pid}", "step-000003"]  # a live writer is left alone
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()


def test_resume_skips_a_corrupt_newest_checkpoint_and_still_matches_exactly(tmp_path, reference, capsys):
    args = run_args("adamw", tmp_path, "run")
    part = Trainer(load_config(None, args), hooks=[stop_at(7)]).run()
    assert part.interrupted and part.steps == 7
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.find_checkpoints(root)] == ["step-000006", "step-000007"]
    _corrupt_flipped_byte(root / "step-000007")  # bit rot, same size
    resumed = Trainer(load_config(None, [*args, "train.resume=auto"]))
    with pytest.warns(UserWarning, match=r"step-000007: model/model\.safetensors is corrupt"):
        summary = resumed.run()
    assert resumed.resumed_from.name == "step-000006" and summary.metrics["steps_this_run"] == 6
    ref = reference("adamw")
    assert_same_weights(ref / "final", summary.final_dir)
    assert losses(summary.run_dir) == losses(ref)


def test_a_killed_export_leaves_no_garbage_behind(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = tmp_path / f".final.tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    ckpt.atomic_directory(tmp_path / "final", _write_files({"model.safetensors": b"y"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_text_files_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    ckpt.write_text_atomic(path, "old: 1\n")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed just before the rename
        ckpt.write_text_atomic(path, "new: 2\n")
    assert path.read_text() == "old: 1\n"
    monkeypatch.undo()
    ckpt.write_text_atomic(path, "new: 2\n")  # and the next write clears the leftover
    assert path.read_text() == "new: 2\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ------------------------------------------------------------ what a failed write is reported as
class CheckpointException(BaseException):  # noqa: N818 (torch's name, which the code matches)
    """What torch.distributed.checkpoint raises: each rank's failure in ``.failures``."""

    def __init__(self, failures):
        super().__init__("CheckpointException ranks:{0}")
        self.failures = failures


@pytest.fixture
def plenty_of_space(monkeypatch):
    usage = type("Usage", (), {"free": 50 * 2**30})
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage)


def _tmp_with_files(tmp_path):
    tmp = tmp_path / ".step-000003.tmp-1"
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "a.bin").write_bytes(b"a")
    newest = tmp / "optim.bin"
    newest.write_bytes(b"b")
    os.utime(tmp / "model" / "a.bin", ns=(1, 1))
    return tmp


@pytest.mark.parametrize(
    ("make_error", "disk_full", "shown"),
    [
        (lambda: OSError(28, "No space left on device"), True, "OSError: [Errno 28] No space left on device"),
        (lambda: OSError(122, "Disk quota exceeded"), True, "OSError: [Errno 122] Disk quota exceeded"),
        (lambda: RuntimeError("failed: os error 28"), True, "RuntimeError: failed: os error 28"),
        (lambda: RuntimeError("No space left here\nsecond line"), True, "RuntimeError: No space left here"),
        (lambda: PermissionError(13, "denied"), False, "PermissionError: [Errno 13] denied"),
        (lambda: type("SafetensorError", (Exception,), {})("bad"), False, "SafetensorError: bad"),
        (lambda: CheckpointException({1: (OSError(28, "No space left on device"), "traceback")}), True,
         "OSError: [Errno 28] No space left on device"),
        (lambda: CheckpointException({0: PermissionError(13, "denied")}), False,
         "PermissionError: [Errno 13] denied"),
    ],
    ids=["enospc", "edquot", "safetensors-28", "text", "permission", "safetensors", "dcp", "dcp-bare"],
)  # fmt: skip
def test_a_storage_failure_is_described_with_its_cause_and_file(
    tmp_path, plenty_of_space, make_error, disk_full, shown
):
    tmp = _tmp_with_files(tmp_path)
    target = tmp_path / "step-000003"
    err = ckpt._describe_write_failure(target, tmp, make_error())
    assert err is not None and err.disk_full is disk_full and err.target == target
    assert err.file == "optim.bin"  # the file being written: the newest one in the temporary dir
    why = "the disk is full (51200.0 MiB free)" if disk_full else "a storage error"
    assert str(err) == (
        f"could not write {target}: {why} while writing optim.bin ({shown}). The partial write was "
        "removed; earlier checkpoints are untouched"
    )


def test_a_storage_failure_found_in_the_exception_chain(tmp_path, plenty_of_space):
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("serialization failed") from inner
    except RuntimeError as outer:
        err = ckpt._describe_write_failure(tmp_path / "t", tmp_path / "missing", outer)
    assert err is not None and err.disk_full and err.file is None
    assert "while writing it (RuntimeError: serialization failed)" in str(err)


def test_a_bug_is_not_described_as_a_storage_failure(tmp_path, plenty_of_space):
    assert ckpt._describe_write_failure(tmp_path / "t", tmp_path, ValueError("a bug")) is None
    assert ckpt._describe_write_failure(tmp_path / "t", tmp_path, KeyError("optim")) is None


def test_a_nearly_full_disk_is_reported_even_when_the_error_does_not_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("U", (), {"free": 2**19}))
    err = ckpt._describe_write_failure(tmp_path / "t", tmp_path, RuntimeError("unexpected pos 1234"))
    assert err is not None and err.disk_full and "the disk is full (0.5 MiB free)" in str(err)
    named = OSError(5, "I/O error")
    named.filename = "w.safetensors"
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: (_ for _ in ()).throw(OSError("gone")))
    err = ckpt._describe_write_failure(tmp_path / "t", tmp_path / "missing", named)
    assert err is not None and not err.disk_full and err.file == "w.safetensors"
