"""Long context end to end: the rotary base and scaling reach the model, context-extension
fine-tuning, and the passkey / position-ppl evaluations through the CLI."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from leantune.cli import main
from leantune.config import load_config
from leantune.models import build_model
from leantune.trainer import Trainer

QUICK = [
    "model.preset=test",
    "data.format=text",
    "data.max_length=64",
    "data.num_eval=4",
    "train.batch_size=4",
    "train.max_steps=3",
    "optim.warmup_steps=0",
    "eval.every=0",
    "eval.max_batches=1",
    "eval.accuracy_samples=0",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "log.plot=false",
]
HEAD_DIM = 8  # preset "test": hidden 32 / 4 heads


def _words(rng: random.Random, n: int) -> str:
    vocab = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Text documents of 150..500 bytes (tokens, with the byte tokenizer): longer than the short
    run's sequences, so packing splits them, and shorter than the long run's, so it joins them."""
    root = tmp_path_factory.mktemp("longctx")
    rng = random.Random(0)
    train = root / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"text": _words(rng, rng.randint(25, 80))}) + "\n" for _ in range(80))
    )
    held = root / "held_out.jsonl"
    held.write_text("".join(json.dumps({"text": _words(rng, 60)}) + "\n" for _ in range(6)))
    return root, train, held


@pytest.fixture(scope="module")
def short_run(files):
    """A short-context run (64 tokens) with ``model.rope_theta=500``, through the CLI."""
    root, train, _ = files
    argv = ["train", *QUICK, "model.rope_theta=500", f"data.train={train}"]
    assert main([*argv, f"train.output_dir={root / 'runs'}", "train.run_name=short"]) == 0
    return root / "runs" / "short"


def _inv_freq(theta: float, dim: int = HEAD_DIM, factor: float = 1.0) -> torch.Tensor:
    """The oracle: 1 / (factor * theta^(2i/d)), in float64 from Python floats."""
    return torch.tensor(
        [1.0 / (factor * theta ** (2 * i / dim)) for i in range(dim // 2)], dtype=torch.float64
    )


def _check_rotary(model, theta: float, factor: float = 1.0) -> None:
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq.double(), _inv_freq(theta, factor=factor), rtol=1e-6, atol=0)
    # and the cos/sin it hands to attention: angle = position * inv_freq (linear: position / factor)
    positions = torch.tensor([[0, 1, 7, 63, 200]])
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    angles = positions[0, :, None].double() * _inv_freq(theta, factor=factor)[None, :]
    torch.testing.assert_close(cos[0, :, : HEAD_DIM // 2].double(), angles.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[0, :, HEAD_DIM // 2 :].double(), angles.sin(), rtol=0, atol=1e-5)


def _load(directory):
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)


# ------------------------------------------------------------------------ rope_theta / rope_scaling


def test_rope_theta_reaches_the_rotary_embedding(short_run):
    saved = json.loads((short_run / "final" / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_theta": 500.0, "rope_type": "default"}
    _check_rotary(_load(short_run / "final"), 500.0)


def test_rope_scaling_on_a_local_model_keeps_its_base(short_run, files):
    """transformers 5 keeps rope_type and rope_theta in one dict: a linear scaling passed through
    ``model.rope_scaling`` must not drop the model's base (it did: ``None ** tensor``)."""
    root, train, _ = files
    argv = [
        "train",
        *QUICK,
        "train.max_steps=1",
        f"model.path={short_run / 'final'}",
        "model.rope_scaling={rope_type: linear, factor: 2.0}",
        f"data.train={train}",
        f"train.output_dir={root / 'runs'}",
        "train.run_name=linear",
    ]
    assert main(argv) == 0
    final = root / "runs" / "linear" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    model = _load(final)
    assert model.model.rotary_emb.rope_type == "linear"
    _check_rotary(model, 500.0, factor=2.0)


@pytest.mark.parametrize(
    "source, overrides, expect",
    [
        ("preset", {"rope_theta": 2e3}, {"rope_type": "default", "rope_theta": 2e3}),
        (
            "preset",
            {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
            {"factor": 4.0, "rope_theta": 1e4},
        ),
        (
            "preset",
            {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 50.0},
            {"rope_theta": 50.0},
        ),
        ("path", {"rope_theta": 8e3}, {"rope_type": "default", "rope_theta": 8e3}),
        (
            "path",
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            {"rope_type": "dynamic", "rope_theta": 500.0},
        ),
        (
            "path",
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_theta": 1e3},
            {"rope_type": "yarn", "rope_theta": 1e3, "original_max_position_embeddings": 256},
        ),
    ],
)
def test_build_model_rope_overrides(short_run, source, overrides, expect):
    kwargs = {"preset": "test", "vocab_size": 64} if source == "preset" else {"path": short_run / "final"}
    model = build_model(**kwargs, config_overrides=overrides)
    params = model.config.rope_parameters
    assert {k: params.get(k) for k in expect} == expect
    if params["rope_type"] in ("default", "linear"):
        _check_rotary(model, params["rope_theta"], factor=params.get("factor", 1.0))


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "linear"}, r"Missing required keys .* \{'factor'\}"),
        ({"rope_type": "lineer", "factor": 2.0}, r"unknown rope_type 'lineer'; known: .*linear"),
        ({"factor": 2.0}, r"needs a rope_type"),
        ("linear", r"must be a dict"),
    ],
)
def test_bad_rope_scaling_is_a_clear_error(short_run, scaling, message):
    for kwargs in ({"preset": "test"}, {"path": short_run / "final"}):
        with pytest.raises(ValueError, match=message):
            build_model(**kwargs, config_overrides={"rope_scaling": scaling})


def test_bad_rope_scaling_through_the_cli(files, capsys):
    root, train, _ = files
    argv = ["train", *QUICK, f"data.train={train}", f"train.output_dir={root / 'runs'}", "train.run_name=bad"]
    assert main([*argv, "model.rope_scaling={factor: 2.0}"]) == 2
    assert "model: rope_scaling needs a rope_type" in capsys.readouterr().err


# ------------------------------------------------------------------------ context extension


def test_context_extension_from_a_short_run(short_run, files):
    """Continue the 64-token run at 128 tokens with a 16x base, AdaLomo and checkpointing."""
    root, train, _ = files
    overrides = [
        *QUICK,
        f"model.path={short_run / 'final'}",
        "model.rope_theta=8000",
        "model.gradient_checkpointing=true",
        "optim.name=adalomo",
        "optim.lr=1e-3",
        f"data.train={train}",
        "data.max_length=128",
        f"train.output_dir={root / 'runs'}",
        "train.run_name=extended",
    ]
    trainer = Trainer(load_config(None, overrides))
    summary = trainer.run()
    model = trainer.model
    assert type(trainer.optimizer).__name__ == "AdaLomo"
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    _check_rotary(model, 8000.0)
    # Packed: every sequence is exactly 128 tokens, and documents run across sequence boundaries
    # (a sequence starts mid-document) as well as several sharing one (an eos inside a sequence).
    eos, bos = trainer.tokenizer.eos_token_id, trainer.tokenizer.bos_token_id
    samples = trainer.data.train
    assert {len(s.input_ids) for s in samples} == {128}
    assert any(s.input_ids[0] != bos for s in samples)
    assert any(eos in s.input_ids[:-1] for s in samples)
    losses = [json.loads(x) for x in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in losses if r["kind"] == "train"]
    assert len(train_losses) == 3 and all(math.isfinite(x) for x in train_losses)
    saved = json.loads((summary.final_dir / "config.json").read_text())
    assert saved["rope_parameters"]["rope_theta"] == 8000.0
    before = _load(short_run / "final").state_dict()
    after = _load(summary.final_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


# ------------------------------------------------------------------------ eval tasks


def test_eval_passkey_writes_grid_and_heatmap(short_run, tmp_path, capsys):
    png = tmp_path / "pk" / "grid.png"
    argv = ["eval", str(short_run), "--task", "passkey", "--lengths", "128,192", "--depths", "0,0.5,1"]
    assert main([*argv, "--samples-per-cell", "2", "--no-header", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "passkey accuracy" in out and "length \\ depth" in out
    assert png.stat().st_size > 1000
    grid = json.loads(png.with_suffix(".json").read_text())
    assert grid["lengths"] == [128, 192] and grid["depths"] == [0.0, 0.5, 1.0]
    assert len(grid["records"]) == 12 and all(len(row) == 3 for row in grid["accuracy"])


def test_eval_position_ppl_writes_buckets(short_run, files, capsys):
    _, _, held = files
    argv = ["eval", str(short_run), "--task", "position-ppl", "--data", str(held), "--lengths", "64,128"]
    assert main([*argv, "--bucket", "32"]) == 0
    assert "positions" in capsys.readouterr().out
    result = json.loads((short_run / "position_ppl.json").read_text())
    assert list(result) == ["64", "128"]
    assert [(b["start"], b["end"]) for b in result["128"]] == [(1, 32), (32, 64), (64, 96), (96, 128)]
    assert all(math.isfinite(b["perplexity"]) for b in result["128"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "passkey", "--depths", "0,1.5"], r"depths must lie in \[0, 1\]"),
        (["--task", "passkey", "--lengths", "0,128"], r"expected positive integers"),
        (["--task", "passkey", "--lengths", "128,x"], r"expected comma-separated integers"),
    ],
)
def test_eval_rejects_bad_arguments(short_run, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:  # argparse: usage and the message on stderr, status 2
        main(["eval", str(short_run), *extra])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "position-ppl"], r"--task position-ppl needs --data FILE"),
        (["--task", "position-ppl", "--data", "HELD", "--lengths", "100000"], r"fewer than the shortest"),
        (["--task", "passkey", "--lengths", "64"], r"length must be at least \d+ tokens"),
    ],
)
def test_eval_errors_are_clear(short_run, files, capsys, extra, message):
    _, _, held = files
    argv = ["eval", str(short_run), *[str(held) if x == "HELD" else x for x in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("leantune eval:") and re.search(message, err), err
