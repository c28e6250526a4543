"""Disk full during a checkpoint: the run stops with a message that names the file, says the disk
is full, that the previous checkpoint is intact and how to resume; resuming (with space again)
finishes the run exactly."""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import subprocess

import pytest

from leantune.checkpoint import find_checkpoints, verify_checkpoint
from leantune.cli import main
from tests.reliability.common import assert_same_weights, losses, run_args

MESSAGE = (
    r"leantune train: stopped: could not write (?P<target>\S+/step-000006): the disk is full \(.*\) while "
    r"writing (?P<file>\S+) \(.*\)\. The partial write was removed; earlier checkpoints are untouched\.\n"
    r"The newest intact checkpoint is (?P<kept>\S+/step-000003) \(verified\): nothing up to its step is "
    r"lost\.\nFree some disk space, then resume with:\n  leantune train (?P<command>.+)\n"
)


def _check_report(err, run_dir):
    found = re.search(MESSAGE, err)
    assert found, err
    assert found["kept"] == str(run_dir / "checkpoints" / "step-000003")
    assert [p.name for p in find_checkpoints(run_dir / "checkpoints")] == ["step-000003"]
    verify_checkpoint(run_dir / "checkpoints" / "step-000003")
    assert not list((run_dir / "checkpoints").glob(".*"))  # the partial write is gone
    assert "Traceback" not in err
    return found


def test_disk_full_while_writing_the_weights(tmp_path, capsys, monkeypatch, reference):
    """A patched safetensors writer: the second checkpoint's weight file fills the disk half-way."""
    import transformers.modeling_utils as mu

    real, calls = mu.safe_save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)
        if len(calls) == 2:
            with open(filename, "r+b") as fh:  # what the disk took before it was full
                fh.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(mu, "safe_save_file", full_disk)
    run_dir = tmp_path / "run"
    assert main(["train", *run_args("adalomo", tmp_path, "run")]) == 1
    found = _check_report(capsys.readouterr().err, run_dir)
    assert found["file"] == "model/model.safetensors"

    monkeypatch.setattr(mu, "safe_save_file", real)  # space again
    assert main(["train", *shlex.split(found["command"])]) == 0
    assert_same_weights(reference("adalomo") / "final", run_dir / "final")
    assert losses(run_dir) == losses(reference("adalomo"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 480 KiB filesystem (one checkpoint fits, a second does not); needs mount rights."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=480k", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(small_tmpfs, capsys, reference):
    run_dir = small_tmpfs / "run"
    assert main(["train", *run_args("adalomo", small_tmpfs, "run")]) == 1
    found = _check_report(capsys.readouterr().err, run_dir)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)  # space again
    assert main(["train", *shlex.split(found["command"])]) == 0
    assert_same_weights(reference("adalomo") / "final", run_dir / "final")
    assert losses(run_dir) == losses(reference("adalomo"))
