"""`leantune train dist.pp=2` (torchrun, gloo): one pipeline stage per rank against one process on
the same batches, resumed across the two layouts; the settings it does not run are config errors.

The pipeline itself (stages, schedules, optimizers) is tested in tests/distributed/test_pipeline.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.distributed.test_multirank import (  # noqa: F401 - text_file is a fixture
    ENV,
    assert_weights_close,
    common,
    final_weights,
    launch,
    losses,
    text_file,
    truncate_to_checkpoint,
)

pytestmark = pytest.mark.distributed


def args(out, *extra: str) -> list[str]:
    # the built-in instruction data: batches of different lengths, padded by the pipeline to
    # data.max_length; LOMO with clipping: the norm is summed over the stages
    return [
        "model.preset=test", "data.max_length=32", "train.batch_size=8", "train.max_steps=6",
        "optim.name=lomo", "optim.lr=0.05", "optim.clip_grad_norm=0.5", "optim.warmup_steps=2",
        "eval.every=0", "eval.accuracy_samples=0", "log.every=1", "log.progress=false",
        "log.tensorboard=false", "log.plot=false", f"train.output_dir={out}", "train.run_name=r",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp-ref")
    launch(args(out), 1)
    return out / "r"


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)], ids=["pp2-to-1", "1-to-pp2"])
def test_pipeline_run_resumes_across_layouts_and_equals_one_rank(one_rank, tmp_path, first, second):
    def run(stages: int, *extra: str) -> subprocess.CompletedProcess:
        layout = [f"dist.pp={stages}", "dist.pp_schedule=gpipe" if first == 1 else "dist.pp_schedule=1f1b"]
        return launch(args(tmp_path, "train.save_every=3", *(layout if stages > 1 else []), *extra), stages)

    done = run(first)
    truncate_to_checkpoint(tmp_path / "r", 3)
    resumed = run(second, "train.resume=auto")
    assert "resumed from" in resumed.stdout and "step-000003" in resumed.stdout
    pp_run = done if first == 2 else resumed
    assert "pipeline: 2 stages" in pp_run.stdout
    assert_weights_close(final_weights(tmp_path / "r"), final_weights(one_rank))
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "r")), torch.tensor(losses(one_rank)), rtol=1e-5, atol=1e-6
    )


def test_tensor_parallel_stages_equal_one_rank(one_rank, tmp_path):
    """dist.pp=2 x dist.tp=2 on 4 ranks: each stage split over 2 ranks; LOMO's clipping norm counts
    each stage's shards once and its replicated tensors (norms) once, summed over the stages."""
    proc = launch(args(tmp_path, "dist.pp=2", "dist.tp=2"), 4)
    assert "tensor parallel 2" in proc.stdout and "pipeline: 2 stages" in proc.stdout
    assert_weights_close(final_weights(tmp_path / "r"), final_weights(one_rank))
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "r")), torch.tensor(losses(one_rank)), rtol=1e-5, atol=1e-6
    )


def test_two_pipelines_of_two_stages_equal_one_rank(text_file, tmp_path):  # noqa: F811
    """dist.pp=2 x dist.strategy=ddp on 4 ranks: each pipeline reads half of every global batch
    (equal-length packed text, so the mean of the two halves' losses is the global mean), each
    stage's gradients averaged over its replica in the hooks, the norm summed over the stages."""
    opt = ["optim.name=lomo", "optim.lr=0.05", "optim.clip_grad_norm=0.5", "train.max_steps=4"]
    launch([*common(text_file, tmp_path / "one"), *opt, "train.batch_size=8", "train.run_name=r"], 1)
    proc = launch(
        [*common(text_file, tmp_path / "pp"), *opt, "train.batch_size=4", "dist.pp=2", "dist.strategy=ddp",
         "train.run_name=r"],
        4,
    )  # fmt: skip
    assert "pipeline: 2 stages" in proc.stdout
    assert_weights_close(final_weights(tmp_path / "pp" / "r"), final_weights(tmp_path / "one" / "r"))
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "pp" / "r")),
        torch.tensor(losses(tmp_path / "one" / "r")),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["optim.name=adamw"], "dist.pp=2 needs an optimizer fused into backward"),
        (["dist.strategy=fsdp"], "dist.pp=2 with dist.strategy=fsdp is not supported yet"),
        (["dist.nproc=4"], "dist.nproc=4 with dist.pp=2 makes 2 pipelines: set dist.strategy=ddp"),
        (["train.batch_size=3"], "train.batch_size=3 must be a multiple of the 2 micro-batches"),
        (["dist.pp_microbatches=1", "train.batch_size=4"], "dist.pp_schedule=1f1b needs at least dist.pp=2"),
        (["dist.pp_schedule=zb"], "dist.pp_schedule must be 1f1b or gpipe"),
    ],
    ids=["adamw", "fsdp", "pipelines", "batch", "1f1b", "schedule"],
)
def test_unsupported_settings_are_config_errors(tmp_path, extra, message):
    cmd = [sys.executable, "-m", "leantune", "train", "model.preset=test", "dist.pp=2", "dist.nproc=2",
           f"train.output_dir={tmp_path}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stdout + proc.stderr


def test_tied_embeddings_are_refused_by_the_stages(tmp_path):
    """The default job's `tiny` preset ties its head to the embeddings, which lie on different stages."""
    cmd = [sys.executable, "-m", "leantune", "train", "dist.pp=2", "dist.nproc=2", "train.max_steps=1",
           f"train.output_dir={tmp_path}", "log.progress=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0
    assert "tied" in proc.stdout + proc.stderr
