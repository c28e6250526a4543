"""End to end through the CLI: train a tiny model, then eval, generate, plot and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from leantune.cli import main
from leantune.config import load_config
from leantune.trainer import Trainer
from tests.helpers import stop_at

TINY = [
    "model.preset=test",
    "data.num_train=600",
    "data.num_eval=32",
    "data.tasks=reverse,sort",
    "train.batch_size=8",
    "train.max_steps=24",
    "optim.lr=0.05",
    "optim.warmup_steps=2",
    "eval.every=12",
    "eval.accuracy_samples=8",
    "eval.max_new_tokens=6",
    "log.every=2",
    "log.progress=false",
]


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real `python -m leantune train` run in a subprocess."""
    out = tmp_path_factory.mktemp("runs")
    cmd = [
        sys.executable,
        "-m",
        "leantune",
        "train",
        *TINY,
        f"train.output_dir={out}",
        "train.run_name=r",
        "train.save_every=12",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "r", proc.stdout


def test_train_writes_everything_and_loss_falls(trained):
    run_dir, stdout = trained
    assert "leantune: resolved config" in stdout and "run summary" in stdout
    assert "exact match" in stdout and "peak memory" in stdout
    assert "loss: chunked linear cross-entropy (256 tokens per chunk)" in stdout
    assert "memory: glibc mmap threshold fixed at 1 MiB" in stdout
    for rel in (
        "config.yaml",
        "metrics.jsonl",
        "plot.png",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "final/manifest.json",
    ):
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-000012", "step-000024"]
    log = read_log(run_dir)
    train_losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert len(train_losses) == 12
    assert sum(train_losses[-2:]) < 0.9 * sum(train_losses[:2])  # from ln(263) = 5.57 down
    evals = [r for r in log if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [12, 24]
    assert {"eval_loss", "eval_ppl", "acc/reverse", "acc/sort"} <= set(evals[-1])
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 for r in log if r["kind"] == "train")


def test_eval_generate_and_plot_on_the_checkpoint(trained, capsys):
    run_dir, _ = trained
    assert main(["eval", str(run_dir), "--accuracy-samples", "8", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "eval loss" in out and "perplexity" in out and "exact match sort" in out
    assert main(["generate", str(run_dir / "final"), "sort 4213", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert (
        main(["generate", str(run_dir), "reverse abc", "--sample", "--seed", "1", "--max-new-tokens", "4"])
        == 0
    )
    assert main(["plot", str(run_dir), "--out", str(run_dir / "again.png")]) == 0
    assert (run_dir / "again.png").stat().st_size > 1000


def test_eval_and_generate_errors_are_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "hi"]) == 2
    assert "neither a model directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_train_cli_reports_config_errors(capsys):
    assert main(["train", "optim.lrr=1"]) == 2
    assert "Did you mean 'optim.lr'?" in capsys.readouterr().err
    assert main(["train", "data.train=/no/such/file.jsonl", "model.preset=test", "log.progress=false"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [["optim.name=adalomo", "train.accumulation_steps=2"], ["optim.name=adamw", "optim.lr=3e-3"]],
    ids=["adalomo-accum", "adamw"],
)
def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tmp_path, extra, device):
    common = [
        *TINY,
        f"train.device={device.type}",
        f"train.output_dir={tmp_path}",
        "eval.every=0",
        "log.every=1",
        "log.plot=false",
        "log.tensorboard=false",
        "train.max_steps=10",
        *extra,
    ]
    full = Trainer(load_config(None, [*common, "train.run_name=full"])).run()
    part = Trainer(load_config(None, [*common, "train.run_name=part"]), hooks=[stop_at(6)]).run()
    assert part.interrupted and part.steps == 6
    resumed = Trainer(load_config(None, [*common, "train.run_name=part", "train.resume=auto"]))
    summary = resumed.run()
    assert summary.steps == 10 and summary.metrics["steps_this_run"] == 4
    assert resumed.resumed_from.name == "step-000006"
    a, b = weights(full.final_dir), weights(summary.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [(r["step"], r["loss"]) for r in read_log(full.run_dir) if r["kind"] == "train"]
    lb = [(r["step"], r["loss"]) for r in read_log(summary.run_dir) if r["kind"] == "train"]
    assert la == lb and [s for s, _ in lb] == list(range(1, 11))


def test_resume_refuses_a_different_training_config(tmp_path):
    common = [
        *TINY,
        f"train.output_dir={tmp_path}",
        "train.run_name=r",
        "train.max_steps=4",
        "eval.every=0",
        "log.plot=false",
        "log.tensorboard=false",
    ]
    Trainer(load_config(None, common)).run()
    with pytest.raises(Exception, match=r"optim\.lr: run has 0\.05, now 0\.01"):
        Trainer(load_config(None, [*common, "train.resume=auto", "optim.lr=0.01", "train.max_steps=6"])).run()
    with pytest.raises(Exception, match="already holds checkpoints"):
        Trainer(load_config(None, common)).run()


class SlowEval(Trainer):
    """Evaluation takes a known, long time."""

    def evaluate(self):
        time.sleep(1.0)
        return super().evaluate()


def test_throughput_excludes_evaluation_and_checkpoint_time(tmp_path):
    cfg = load_config(
        None,
        [
            *TINY,
            f"train.output_dir={tmp_path}",
            "train.run_name=r",
            "train.max_steps=6",
            "eval.every=1",
            "eval.accuracy_samples=0",
            "train.save_every=2",
            "log.plot=false",
            "log.tensorboard=false",
        ],
    )
    t0 = time.perf_counter()
    summary = SlowEval(cfg).run()
    wall = time.perf_counter() - t0
    # Five in-loop evaluations sleep 5 s in all: the training time leaves them out, however slow
    # the machine (a bound relative to this run's own wall time, not a number of seconds).
    assert summary.metrics["train_seconds"] < wall - 4.9
    assert summary.metrics["tokens_per_s"] > 0


def test_the_chunked_loss_trains_like_the_standard_one(tmp_path):
    # Same data, same model: the default chunked loss (here 16 tokens per chunk, many chunks per
    # batch) and train.loss_chunk=0 give the same losses and evaluation, to fp32 rounding.
    common = [*TINY, f"train.output_dir={tmp_path}", "train.max_steps=8", "eval.every=4",
              "eval.accuracy_samples=0", "log.every=1", "log.plot=false"]  # fmt: skip
    runs = {}
    for chunk in (0, 16):
        cfg = load_config(
            None, [*common, "log.tensorboard=false", f"train.loss_chunk={chunk}", f"train.run_name=c{chunk}"]
        )
        runs[chunk] = read_log(Trainer(cfg).run().run_dir)
    for kind, key in (("train", "loss"), ("eval", "eval_loss")):
        a = [r[key] for r in runs[0] if r["kind"] == kind]
        b = [r[key] for r in runs[16] if r["kind"] == kind]
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, rel=1e-4), kind
