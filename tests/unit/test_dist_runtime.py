"""leantune.distributed.runtime in one process: set-up without torchrun, and leaving a worker."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from leantune.distributed.runtime import init_distributed, run_on_main


def test_single_process_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed("ddp", device="cpu")
    assert (env.rank, env.world_size, env.backend, env.is_main) == (0, 1, None, True)
    assert env.device == torch.device("cpu")
    assert run_on_main(lambda: 41 + 1) == 42


def test_strategy_none_under_torchrun_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="dist.strategy=none: set dist.strategy=ddp or fsdp"):
        init_distributed("none", device="cpu")


def test_cuda_requested_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        init_distributed("none", device="cuda")


def test_exit_worker_flushes_and_skips_interpreter_teardown():
    # atexit handlers (and the finalisation in which gloo can abort) must not run; buffered output must
    # not be lost, and the exit code is the one given
    code = (
        "import atexit, sys\n"
        "from leantune.distributed.runtime import exit_worker\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "sys.stdout.write('out-without-newline'); sys.stderr.write('err-without-newline')\n"
        "exit_worker(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "out-without-newline"
    assert proc.stderr == "err-without-newline"


def test_fsdp_in_one_process_without_torchrun_makes_a_one_rank_group(monkeypatch):
    # `leantune train dist.strategy=fsdp` with no torchrun (FSDP2's CPU offload on one GPU): FSDP2
    # would otherwise look for torchrun's RANK and fail.
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    try:
        env = init_distributed("fsdp", "cpu")
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert (env.rank, env.world_size, env.backend) == (0, 1, "gloo")
        t = torch.ones(3)
        dist.all_reduce(t)
        assert torch.equal(t, torch.ones(3))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("group", [False, True], ids=["no-group", "world-of-one"])
def test_ddp_with_one_replica_leaves_the_model_unwrapped(group):
    """One process (with or without torchrun's one-rank group): nothing to average, and a
    DistributedDataParallel wrapper would hold a bucket copy of every gradient for nothing."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from leantune.distributed.strategy import wrap_model

    model = torch.nn.Linear(4, 3)
    if group:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        cfg = SimpleNamespace(tp=1)
        assert wrap_model(model, "ddp", fused=False, device=torch.device("cpu"), dist_cfg=cfg) is model
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
