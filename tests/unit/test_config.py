"""Typed config: YAML + overrides, strict keys with suggestions, types, ranges, documentation."""

from __future__ import annotations

import dataclasses
import re

import pytest

from leantune.cli import main
from leantune.config import (
    SECTIONS,
    Config,
    ConfigError,
    config_diff,
    config_from_dict,
    field_docs,
    load_config,
    render_config,
)


def test_defaults_are_valid_and_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "optim.lr=3e-4",
            "optim.name=adamw",
            "train.max_steps=10",
            "data.tasks=add,sort",
            "optim.kwargs={betas: [0.9, 0.95]}",
            "model.rope_theta=5e5",
            "optim.clip_grad_norm=null",
            "log.progress=false",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 10
    assert cfg.data.tasks == ["add", "sort"]
    assert cfg.optim.kwargs == {"betas": [0.9, 0.95]}
    assert cfg.model.rope_theta == 5e5
    assert cfg.optim.clip_grad_norm is None
    assert cfg.log.progress is False


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: lomo\n  lr: 1e-2\ntrain:\n  batch_size: 4\n")
    cfg = load_config(path, ["train.batch_size=8"])
    assert cfg.optim.name == "lomo"
    assert cfg.optim.lr == 1e-2  # YAML reads "1e-2" as a string; the field type makes it a float
    assert cfg.train.batch_size == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
        (["optimm.lr=1"], "Unknown config key 'optimm.lr'. Did you mean 'optim.lr'?"),
        (["lr=1"], "Unknown config key 'lr'. Did you mean 'optim.lr'?"),
        (["train.batchsize=4"], "Did you mean 'train.batch_size'?"),
        (["optim.lr"], "must look like section.key=value"),
        (["optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
        (["train.max_steps=1.5"], "train.max_steps: expected an integer"),
        (["log.plot=maybe"], "log.plot: expected true or false"),
        (["optim.kwargs=[1, 2]"], "optim.kwargs: expected a mapping"),
        (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["model.dtype=fp8"], "model.dtype must be one of fp32, bf16, fp16"),
        (["model.preset=7bb"], "did you mean '7b'?"),
        (["model.dtype=fp16"], "needs loss scaling"),
        (["optim.name=adamww"], "optim.name: Unknown optimizer 'adamww'. Did you mean 'adamw'?"),
        (["optim.loss_scale=lots"], "optim.loss_scale must be null, 'dynamic' or a positive number"),
        (["data.overlong=cut"], "data.overlong must be truncate or drop"),
        (["train.max_steps=0"], "set train.max_steps or train.epochs"),
        (["optim.scheduler=step"], "optim.scheduler must be constant, linear or cosine"),
        (["dist.strategy=zero3"], "dist.strategy must be none, ddp or fsdp"),
        (["data.task_weights=[1, 2]"], "data.task_weights has 2 entries for 4 data.tasks"),
        (["train.loss_chunk=-1"], "train.loss_chunk must be >= 0 tokens (0 = the standard loss), got -1"),
        (["train.loss_chunk=true"], "train.loss_chunk: expected an integer, got 'true'"),
        (["data.task_weights=[1, 1, -1, 1]"], "data.task_weights must be finite, >= 0, with a positive sum"),
        (["data.task_weights=[0, 0, 0, 0]"], "data.task_weights must be finite, >= 0, with a positive sum"),
        (["data.task_weights=[1, 1, .nan, 1]"], "data.task_weights must be finite"),
    ],
)
def test_bad_config_is_an_error_that_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="Unknown config key 'optim.learning_rate'"):
        load_config(typo)
    section = tmp_path / "section.yaml"
    section.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="Unknown config key 'optimizer'"):
        load_config(section)


def test_every_field_is_documented_and_rendered():
    text = render_config()
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"
            assert f"  {f.name}:" in text
    assert "# Peak learning rate." in text


def test_render_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=0.01", "data.tasks=sort", "optim.kwargs={a: 1}"])
    path = tmp_path / "saved.yaml"
    path.write_text(render_config(cfg, comments=False))
    again = load_config(path)
    assert again == cfg
    assert config_diff(cfg, again) == []
    assert config_from_dict(cfg.to_dict()) == cfg


def test_config_diff_lists_differences():
    a, b = Config(), load_config(None, ["optim.lr=0.2", "train.batch_size=3"])
    assert {k for k, _, _ in config_diff(a, b)} == {"optim.lr", "train.batch_size"}


def test_config_command_prints_documented_defaults(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "optim:" in out and "name: adalomo" in out and "# Optimizer" in out
    assert main(["config", "optim.lr=0.5", "--no-comments"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "#" not in out
    assert main(["config", "optim.lrr=1"]) == 2
    assert "Did you mean 'optim.lr'?" in capsys.readouterr().err
