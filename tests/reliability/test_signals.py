"""SIGTERM / SIGINT: the run saves a checkpoint, says how to resume, and exits; resuming with the
printed command finishes the run exactly as if it had never stopped."""

from __future__ import annotations

import re
import shlex
import signal
from pathlib import Path

import pytest

from leantune.checkpoint import verify_checkpoint
from leantune.cli import main
from tests.reliability.common import assert_same_weights, last_step, losses, run_args, start_cli, wait_for


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optimizer", "sig"), [("adalomo", signal.SIGTERM), ("adamw", signal.SIGINT)], ids=["term", "int"]
)
def test_signal_saves_and_prints_a_resume_command_that_finishes_the_run_exactly(
    optimizer, sig, tmp_path, reference
):
    run_dir = tmp_path / "run"
    proc = start_cli(run_args(optimizer, tmp_path, "run"), tmp_path / "log")
    assert wait_for(lambda: last_step(run_dir) >= 4, proc) and proc.poll() is None
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130
    out = (tmp_path / "log.out").read_text()
    found = re.search(
        r"(SIG\w+) received: saved (\S+) at step (\d+)\. Resume with:\n  leantune train (.+)\n", out
    )
    assert found, out[-2000:]
    name, saved, step, command = found.groups()
    assert name == sig.name and int(step) >= 4 and last_step(run_dir) == int(step)
    assert Path(saved).name == f"step-{int(step):06d}"
    verify_checkpoint(Path(saved))
    assert "Traceback" not in (tmp_path / "log.err").read_text()

    # The printed command is complete: the run's own settings are repeated in it.
    assert main(["train", *shlex.split(command)]) == 0
    ref = reference(optimizer)
    assert_same_weights(ref / "final", run_dir / "final")
    assert losses(run_dir) == losses(ref)


@pytest.mark.slow
def test_a_second_signal_during_the_save_stops_at_once_and_the_run_still_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    writing = lambda: sorted((run_dir / "checkpoints").glob(".step-*.tmp-*"))  # noqa: E731
    proc = start_cli(run_args("adalomo", tmp_path, "run"), tmp_path / "log", slow=True)
    assert wait_for(lambda: last_step(run_dir) >= 4, proc) and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    assert wait_for(lambda: bool(writing()), proc)  # the save it asked for is under way (slowly)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "log.err").read_text()
    found = re.search(
        r"interrupted \(a checkpoint being written is discarded\)\. Resume from the last "
        r"complete one with:\n  leantune train (.+)\n",
        err,
    )
    assert found, err[-2000:]
    assert writing()  # the abandoned write; never taken for a checkpoint
    assert main(["train", *shlex.split(found.group(1))]) == 0
    ref = reference("adalomo")
    assert_same_weights(ref / "final", run_dir / "final")
    assert losses(run_dir) == losses(ref)
    assert not writing()
