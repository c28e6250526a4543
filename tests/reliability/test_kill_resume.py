"""Exact resume after ``kill -9``: at a random step, and in the middle of a checkpoint write.

For AdamW and AdaLomo (both with gradient accumulation; AdaLomo also on bf16 weights with stochastic
rounding, and LOMO on fp16 weights with dynamic loss scaling) ``leantune train ... train.resume=auto`` is
started in a subprocess and killed with SIGKILL, restarted with the same command, killed again
while a checkpoint is being written, then allowed to finish. Its final weights and its per-step
loss log must equal an uninterrupted run's, bitwise. The kill points come from a seeded RNG whose
seed is printed (``pytest -s``; ``LEANTUNE_FAULT_SEED=<seed>`` repeats them).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess

import pytest

from leantune.checkpoint import MANIFEST, find_checkpoints, verify_checkpoint
from tests.reliability.common import (
    LOW_PRECISION,
    OPTIMIZERS,
    all_finite,
    assert_same_weights,
    last_step,
    losses,
    run_args,
    start_cli,
    wait_for,
)

STEPS = 12


def _tmp_dirs(run_dir, pid="*"):
    """Temporary directories of checkpoint writes (of process ``pid``)."""
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.glob(f".step-*.tmp-{pid}")) if root.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [*OPTIMIZERS, *LOW_PRECISION])
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(
    optimizer, tmp_path, reference, fault_rng
):
    ref = reference(optimizer)
    args = run_args(optimizer, tmp_path, "run", "train.resume=auto")
    run_dir = tmp_path / "run"
    kills = []

    # 1. Killed at a random step after the first checkpoint (step 3).
    target = fault_rng.randint(4, STEPS - 4)
    proc = start_cli(args, tmp_path / "cycle1")
    running = wait_for(lambda: last_step(run_dir) >= target, proc)
    assert running and proc.poll() is None, (tmp_path / "cycle1.err").read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    kills.append(f"step {last_step(run_dir)} (aimed at {target})")

    # 2. Killed while a checkpoint is being written (slowed down so that the kill lands inside):
    # a random delay after its temporary directory appears.
    proc = start_cli(args, tmp_path / "cycle2", slow=True)
    mine = lambda: _tmp_dirs(run_dir, proc.pid)  # noqa: E731 - not a leftover of the first kill
    assert wait_for(lambda: bool(mine()), proc), (tmp_path / "cycle2.err").read_text()[-2000:]
    _sleep_while_running(proc, fault_rng.uniform(0.0, 0.6))
    writing = mine()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert writing and mine() == writing  # the kill left a half-written checkpoint
    kills.append(f"writing {writing[0]} (step {last_step(run_dir)})")

    # Every complete checkpoint still verifies; the half-written one is not a checkpoint at all.
    for path in find_checkpoints(run_dir / "checkpoints"):
        verify_checkpoint(path)

    # 3. A checkpoint whose manifest is missing (as after a copy interrupted half-way): resume falls
    # back to the one before it, with a warning.
    newest = find_checkpoints(run_dir / "checkpoints")[-1:]
    if newest:
        (newest[0] / MANIFEST).unlink()

    # 4. The same command again, to the end.
    proc = start_cli(args, tmp_path / "cycle3")
    assert proc.wait(timeout=300) == 0, (tmp_path / "cycle3.err").read_text()[-3000:]
    err = (tmp_path / "cycle3.err").read_text()
    if newest:
        assert f"skipping checkpoint: {newest[0]}: no manifest.json" in err, err[-2000:]

    print(f"[{optimizer}] SIGKILL at: {'; '.join(kills)}; removed manifest: {[p.name for p in newest]}")
    assert_same_weights(ref / "final", run_dir / "final")
    assert losses(run_dir) == losses(ref)
    assert [s for s, _, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert all_finite(run_dir / "final")
    assert not list(run_dir.rglob(".*.tmp-*"))  # leftovers of the killed writes were cleaned up
    for path in find_checkpoints(run_dir / "checkpoints"):
        verify_checkpoint(path)


def _sleep_while_running(proc, seconds: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):  # still running: what we want
        proc.wait(timeout=seconds)
