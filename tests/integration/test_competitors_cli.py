"""The competitors through the trainer and the CLI: they train, the exact ones resume bitwise, the
inexact ones are refused resumption with the way out."""

from __future__ import annotations

import pytest
import torch

from leantune.cli import main
from leantune.config import ConfigError, load_config
from leantune.trainer import Trainer
from tests.helpers import stop_at
from tests.integration.test_train_cli import TINY, read_log, weights

COMMON = [
    *TINY,
    "eval.every=0",
    "log.every=1",
    "log.plot=false",
    "log.tensorboard=false",
    "train.max_steps=8",
    "optim.lr=3e-3",
    "optim.warmup_steps=0",
]


@pytest.mark.parametrize("name", ["adam_mini", "adamw8bit"])
def test_an_exact_competitor_resumes_bitwise(tmp_path, name):
    common = [*COMMON, f"train.output_dir={tmp_path}", f"optim.name={name}"]
    full = Trainer(load_config(None, [*common, "train.run_name=full"])).run()
    part = Trainer(load_config(None, [*common, "train.run_name=part"]), hooks=[stop_at(4)]).run()
    assert part.interrupted and part.steps == 4
    summary = Trainer(load_config(None, [*common, "train.run_name=part", "train.resume=auto"])).run()
    assert summary.steps == 8 and summary.metrics["steps_this_run"] == 4
    a, b = weights(full.final_dir), weights(summary.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in read_log(full.run_dir) if r["kind"] == "train"]
    lb = [r["loss"] for r in read_log(summary.run_dir) if r["kind"] == "train"]
    assert la == lb and len(la) == 8


def test_galore_resumption_is_refused_with_the_way_out(tmp_path):
    common = [*COMMON, f"train.output_dir={tmp_path}", "optim.name=galore", "optim.kwargs={rank: 4}"]
    assert Trainer(load_config(None, [*common, "train.run_name=r"]), hooks=[stop_at(2)]).run().interrupted
    with pytest.raises(
        ConfigError, match=r"optim\.name=galore: GaLore keeps its projectors.*Start a new run"
    ):
        Trainer(load_config(None, [*common, "train.run_name=r", "train.resume=auto"])).run()


def test_leantune_train_with_galore_learns(tmp_path, capsys):
    argv = [
        "train",
        *COMMON,
        "train.max_steps=16",
        "optim.name=galore",
        "optim.kwargs={rank: 8, update_proj_gap: 5}",
        f"train.output_dir={tmp_path}",
        "train.run_name=g",
    ]
    assert main(argv) == 0
    assert "galore" in capsys.readouterr().out
    losses = [r["loss"] for r in read_log(tmp_path / "g") if r["kind"] == "train"]
    assert len(losses) == 16 and sum(losses[-2:]) < 0.9 * sum(losses[:2])
