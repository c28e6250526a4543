"""RoPE scaling-law arithmetic against the paper's numbers (arXiv 2310.05209), config reading and the CLI."""

from __future__ import annotations

import json
import math
import re

import pytest

from leantune.cli import main
from leantune.longctx import (
    base_for_target_length,
    critical_base,
    critical_dimension,
    extrapolation_bound,
    plot_periods,
    rope_params_from_hf_config,
    rope_report,
    rotary_frequencies,
    rotary_periods,
    small_base_thresholds,
)

# LLaMA 2: head dim 128, pretrained at 4096 tokens with base 10000.
D, T_TRAIN, BASE = 128, 4096, 10000.0


# --------------------------------------------------------------------------------------------------
# the paper's values


def test_llama2_critical_dimension_is_92():
    assert critical_dimension(D, T_TRAIN, BASE) == 92


def test_llama2_base_1e6_bound_is_about_129k():
    bound = extrapolation_bound(D, T_TRAIN, 1e6)
    assert bound == pytest.approx(2 * math.pi * 1e6 ** (92 / 128))
    assert 128_000 < bound < 130_000


def test_bound_uses_the_pretraining_critical_dimension():
    # d_extra recomputed at base 1e6 would be 62 and the bound ~5K: the paper's 129K needs the
    # critical dimension of pretraining.
    assert critical_dimension(D, T_TRAIN, 1e6) == 62
    assert extrapolation_bound(D, T_TRAIN, 1e6, pretrain_base=1e6) < 6000


def test_critical_base_4k_to_16k_is_about_7_2e4():
    beta0 = critical_base(T_TRAIN, 16384)
    assert beta0 == pytest.approx(7.2e4, rel=0.01)
    # Independent form: 10000^(ln(T_tune/2pi) / ln(T_train/2pi)).
    assert beta0 == pytest.approx(10000 ** (math.log(16384 / (2 * math.pi)) / math.log(4096 / (2 * math.pi))))


def test_critical_base_without_longer_tuning_is_the_pretraining_base():
    assert critical_base(T_TRAIN, T_TRAIN, pretrain_base=500000.0) == pytest.approx(500000.0)


def test_small_base_thresholds_for_4096():
    assert [round(x) for x in small_base_thresholds(4096)] == [2608, 1304, 652]


def test_periods_and_frequencies():
    periods = rotary_periods(D, BASE)
    freqs = rotary_frequencies(D, BASE)
    assert len(periods) == len(freqs) == D // 2
    assert periods[0] == pytest.approx(2 * math.pi)
    for n, (p, f) in enumerate(zip(periods, freqs)):
        assert f == pytest.approx(BASE ** (-2 * n / D))
        assert p == pytest.approx(2 * math.pi / f)
    # The critical dimension is where periods cross T_train: pair 45 is seen fully, pair 46 is not.
    assert periods[45] <= T_TRAIN * 1.1 and periods[46] > T_TRAIN


def test_critical_dimension_is_clipped_to_head_dim():
    assert critical_dimension(8, 1_000_000, 10000.0) == 8
    assert extrapolation_bound(8, 1_000_000, 1e6) == math.inf


# --------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("target", [5000, 16384, 100_000, 131_072, 1_000_000, 12_345_678])
@pytest.mark.parametrize(("d", "t_train", "pre"), [(128, 4096, 1e4), (64, 2048, 1e4), (128, 8192, 5e5)])
def test_base_for_target_reaches_target(target, d, t_train, pre):
    base = base_for_target_length(d, t_train, target, pretrain_base=pre)
    assert extrapolation_bound(d, t_train, base, pretrain_base=pre) >= target
    # ...and is the smallest: 0.1% less base falls short.
    assert extrapolation_bound(d, t_train, base * 0.999, pretrain_base=pre) < target


def test_base_for_target_closed_form():
    assert base_for_target_length(D, T_TRAIN, 1e6) == pytest.approx((1e6 / (2 * math.pi)) ** (128 / 92))


# --------------------------------------------------------------------------------------------------
# report


def test_report_collects_everything():
    r = rope_report(D, T_TRAIN, 1e6, tune_len=16384, target_len=100_000)
    assert r.critical_dim == 92
    assert r.extrapolation_bound == pytest.approx(extrapolation_bound(D, T_TRAIN, 1e6))
    assert r.critical_base == pytest.approx(critical_base(T_TRAIN, 16384))
    assert r.regime == "larger base"
    assert r.predicted_context == pytest.approx(r.extrapolation_bound)
    assert r.target_reached is True
    assert r.base_for_target == pytest.approx(base_for_target_length(D, T_TRAIN, 100_000))
    text = r.format()
    for needle in ("92 of 128", "129,027", "71,738", "larger base", "reached"):
        assert needle in text
    json.dumps(r.to_dict())


@pytest.mark.parametrize(
    ("base", "tune_len", "regime", "predicted"),
    [
        (1e4, None, "pretrained base", 4096),
        (1e4, 4096, "pretrained base", 4096),
        (1e4, 8192, "larger base, below critical", 8192),
        (2000.0, None, "smaller base", 4096),
        (500.0, None, "smaller base", math.inf),
        (5e4, 16384, "larger base, below critical", 16384),
        (1e6, 16384, "larger base", 2 * math.pi * 1e6 ** (92 / 128)),
    ],
)
def test_report_regimes(base, tune_len, regime, predicted):
    r = rope_report(D, T_TRAIN, base, tune_len=tune_len)
    assert r.regime == regime
    assert r.predicted_context == pytest.approx(predicted)
    assert r.target_reached is None


# --------------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (critical_dimension, {"head_dim": 127, "train_len": 4096}, r"head_dim must be a positive even int"),
        (critical_dimension, {"head_dim": 0, "train_len": 4096}, r"head_dim must be a positive even int"),
        (critical_dimension, {"head_dim": 64.0, "train_len": 4096}, r"head_dim must be an int"),
        (critical_dimension, {"head_dim": True, "train_len": 4096}, r"head_dim must be an int"),
        (critical_dimension, {"head_dim": 128, "train_len": 5}, r"train_len must be > 2\*pi"),
        (critical_dimension, {"head_dim": 128, "train_len": "4096"}, r"train_len must be a number"),
        (critical_dimension, {"head_dim": 128, "train_len": 4096, "base": 1.0}, r"base must be > 1"),
        (extrapolation_bound, {"head_dim": 128, "train_len": 4096, "base": -3}, r"base must be > 1"),
        (extrapolation_bound, {"head_dim": 128, "train_len": 4096, "base": math.nan}, r"base must be finite"),
        (critical_base, {"train_len": 4096, "tune_len": 2048}, r"tune_len \(2048\) must be >= train_len"),
        (
            critical_base,
            {"train_len": 4096, "tune_len": 8192, "pretrain_base": 0.5},
            r"pretrain_base must be > 1",
        ),
        (
            base_for_target_length,
            {"head_dim": 128, "train_len": 4096, "target_len": 0},
            r"target_len must be > 2\*pi",
        ),
        (small_base_thresholds, {"train_len": math.inf}, r"train_len must be finite"),
        (rotary_periods, {"head_dim": 128, "base": 1}, r"base must be > 1"),
        (rope_report, {"head_dim": 128, "train_len": 4096, "base": 1e6, "tune_len": 1}, r"tune_len must be"),
        (
            rope_report,
            {"head_dim": 128, "train_len": 4096, "base": 1e6, "target_len": -1},
            r"target_len must",
        ),
    ],
)
def test_invalid_arguments(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


# --------------------------------------------------------------------------------------------------
# Hugging Face configs

V4 = {"hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 4096, "rope_theta": 10000.0}
V5 = {
    "hidden_size": 3072,
    "num_attention_heads": 24,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0},
}


def _write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (V4, (128, 4096, 10000.0)),
        (V5, (128, 131072, 500000.0)),
        ({**V4, "head_dim": 64}, (64, 4096, 10000.0)),
        ({"text_config": V5, "model_type": "vlm"}, (128, 131072, 500000.0)),
        (
            {**V4, "rope_theta": None, "rope_parameters": {"full_attention": {"rope_theta": 1e6}}},
            (128, 4096, 1e6),
        ),
    ],
)
def test_read_hf_config(tmp_path, cfg, expected):
    _write(tmp_path, cfg)
    assert rope_params_from_hf_config(tmp_path) == expected  # the directory
    assert rope_params_from_hf_config(tmp_path / "config.json") == expected  # the file


def test_read_hf_config_default_theta(tmp_path):
    cfg = {k: v for k, v in V4.items() if k != "rope_theta"}
    _write(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"no rope_theta"):
        rope_params_from_hf_config(tmp_path)
    assert rope_params_from_hf_config(tmp_path, default_rope_theta=10000.0) == (128, 4096, 10000.0)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"num_attention_heads": 32, "max_position_embeddings": 4096, "rope_theta": 1e4}, r"hidden_size"),
        ({"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 1e4}, r"max_position_embeddings"),
        ([1, 2], r"JSON object"),
    ],
)
def test_read_hf_config_errors(tmp_path, cfg, match):
    _write(tmp_path, cfg)
    with pytest.raises(ValueError, match=match):
        rope_params_from_hf_config(tmp_path)


def test_read_hf_config_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        rope_params_from_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        rope_params_from_hf_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        rope_params_from_hf_config(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------------
# plot and CLI


def test_plot_periods_writes_png(tmp_path):
    out = plot_periods(D, 1e6, T_TRAIN, tmp_path / "sub" / "periods.png", pretrain_base=1e4)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_periods(D, 1e4, T_TRAIN, tmp_path / "plain.png")
    assert (tmp_path / "plain.png").stat().st_size > 0


def test_cli_explicit(capsys):
    argv = ["rope", "--head-dim", "128", "--train-len", "4096", "--base", "1e6", "--tune-len", "16384"]
    assert main([*argv, "--target-len", "100000"]) == 0
    out = capsys.readouterr().out
    assert "92 of 128" in out and "129,027" in out and "71,738" in out and "701,472" in out


def test_cli_model_dir_with_override(tmp_path, capsys):
    _write(tmp_path, V4)
    assert (
        main(["rope", "--model", str(tmp_path), "--base", "1000000", "--plot", str(tmp_path / "p.png")]) == 0
    )
    out = capsys.readouterr().out
    assert "92 of 128" in out and "1,000,000" in out and "129,027" in out
    assert (tmp_path / "p.png").is_file()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--base", "1e6"], r"give --model HF_DIR, or all of --head-dim, --train-len and --base"),
        (
            ["--head-dim", "127", "--train-len", "4096", "--base", "1e4"],
            r"--head-dim must be a positive even",
        ),
        (["--head-dim", "128", "--train-len", "4096", "--base", "-1"], r"must be a positive finite number"),
        (["--model", "/nonexistent/dir"], r"--model: Hugging Face config not found"),
    ],
)
def test_cli_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rope", *argv])
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)
