"""`leantune train dist.tp=2` across processes (torchrun, gloo) against one process: the same
global batch gives the same weights and losses (tp=2 for half a run, then ddp, and the other way
round; tp=2 x dp=2 on four ranks); refusals name the cause.

The optimizer math under tensor parallelism, optimizer by optimizer, is in
tests/unit/test_tensor_parallel.py (threads, one process).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.distributed.test_multirank import (  # noqa: F401 - text_file is a fixture
    ENV,
    OPTIMIZERS,
    assert_weights_close,
    common,
    final_weights,
    launch,
    losses,
    text_file,
    truncate_to_checkpoint,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tp_reference(text_file, tmp_path_factory):  # noqa: F811
    """One-rank runs with the global batch (8) of the tensor-parallel runs."""
    out = tmp_path_factory.mktemp("tp-ref")
    runs = {}
    for name in ("adalomo", "lomo-clip"):
        launch(
            [*common(text_file, out), *OPTIMIZERS[name], "train.batch_size=8", f"train.run_name={name}"], 1
        )
        runs[name] = out / name
    return runs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_tp2_by_dp2_with_clipping_equals_one_rank(text_file, tp_reference, tmp_path, strategy):  # noqa: F811
    """Four ranks: two tensor-parallel groups, each reading half of every global batch; across the
    groups the gradients are averaged in the hooks (ddp) or reduce-scattered by FSDP2 (2-D shards)."""
    launch(
        [*common(text_file, tmp_path), *OPTIMIZERS["lomo-clip"], "train.batch_size=4", "dist.tp=2",
         f"dist.strategy={strategy}", "train.run_name=r", "train.max_steps=4"],
        4,
    )  # fmt: skip
    reference = losses(tp_reference["lomo-clip"])[:4]
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "r")), torch.tensor(reference), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(("first", "second"), [("tp", "dp"), ("dp", "tp")], ids=["tp-to-dp", "dp-to-tp"])
def test_checkpoint_resumes_across_tensor_and_data_parallel_layouts(
    text_file,  # noqa: F811
    tp_reference,
    tmp_path,
    first,
    second,  # noqa: F811
):
    """A run stopped after step 3 under one layout and resumed under the other (the global batch
    kept: 8 sequences on tp=2, 2 x 4 on dp=2) ends where the uninterrupted one-rank run does."""

    def args(layout: str) -> list[str]:
        extra = (
            ["dist.tp=2", "train.batch_size=8"]
            if layout == "tp"
            else ["dist.strategy=ddp", "train.batch_size=4"]
        )
        return [*common(text_file, tmp_path), *OPTIMIZERS["adalomo"], *extra, "train.run_name=r",
                "train.save_every=3", "train.keep_last=3"]  # fmt: skip

    first_run = launch(args(first), 2)
    truncate_to_checkpoint(tmp_path / "r", 3)
    proc = launch([*args(second), "train.resume=auto"], 2)
    assert "resumed from" in proc.stdout and "step-000003" in proc.stdout
    tp_run = first_run if first == "tp" else proc
    assert "tensor parallel 2 x data parallel 1" in tp_run.stdout
    assert_weights_close(final_weights(tmp_path / "r"), final_weights(tp_reference["adalomo"]))
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "r")),
        torch.tensor(losses(tp_reference["adalomo"])),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["optim.name=adamw"],
            "dist.tp=2 needs an optimizer whose update is exact on tensor-parallel shards",
        ),
        (["peft.method=lora"], "dist.tp=2 with peft.method=lora is not supported yet"),
        (["dist.nproc=3"], "dist.nproc=3 must be a multiple of dist.tp=2"),
    ],
    ids=["adamw", "lora", "nproc"],
)
def test_unsupported_combinations_are_config_errors(tmp_path, extra, message):
    cmd = [sys.executable, "-m", "leantune", "train", "model.preset=test", "dist.tp=2", "dist.nproc=2",
           f"train.output_dir={tmp_path}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stdout + proc.stderr
