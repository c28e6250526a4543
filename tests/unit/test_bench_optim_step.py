"""benchmarks/optim_step.py on the tiny ``test`` preset: the worker for every configuration in
process, and the parent end to end (fresh subprocesses, report files and fields)."""

from __future__ import annotations

import importlib
import json

import pytest

# Spelled out rather than read from the script, so that a new configuration needs a test here.
CONFIG_NAMES = [
    "floor",
    "sgd",
    "adamw",
    "adafactor",
    "lomo",
    "adalomo",
    "adamw_in_backward",
    "lomo_optim_lomo",
    "lomo_optim_adalomo",
]


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("optim_step")  # benchmarks/ is on pytest's pythonpath


def _worker_params(config: str) -> dict:
    return {
        "config": config,
        "preset": "test",
        "seq": 16,
        "batch": 1,
        "steps": 2,
        "warmup": 1,
        "dtype": "fp32",
        "grad_checkpointing": False,
        "threads": 1,
    }


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_worker_runs_every_configuration(bench, config):
    if config.startswith("lomo_optim"):
        # an optional peer: without it this case is reported as a skip, never as a pass
        pytest.importorskip("lomo_optim", reason="lomo-optim (an optional peer, not a test dependency)")
    import torch

    cuda = torch.Tensor.cuda
    res = bench.run_worker(_worker_params(config))
    assert torch.Tensor.cuda is cuda  # the lomo-optim workaround must not leak
    assert res["ok"] and res["config"] == config
    assert len(res["step_times_s"]) == 3 and res["s_per_step_median"] > 0
    assert res["peak_rss_gib"] > 0 and res["ru_maxrss_gib"] > 0
    assert res["parameters"] > 0 and len(res["losses"]) == 3
    if config != "floor":  # every optimizer changes the weights, so the loss moves
        assert res["losses"][-1] != res["losses"][0]


def test_every_configuration_is_tested(bench):
    assert set(CONFIG_NAMES) == set(bench.CONFIGS)


def test_parent_writes_report(bench, tmp_path, capsys):
    out = tmp_path / "optim_step"
    argv = ["--preset", "test", "--seq", "16", "--steps", "1", "--warmup", "0"]
    report = bench.main([*argv, "--only", "floor,adalomo", "--threads", "1", "--out", str(out)])

    for ext in (".json", ".md", ".png"):
        assert out.with_suffix(ext).is_file(), ext
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["results"].keys() == {"floor", "adalomo"}
    for key in ("torch", "threads", "cpu_model", "loadavg_before", "loadavg_after"):
        assert key in saved["machine"]
    assert saved["command"].startswith("python benchmarks/optim_step.py --preset test")
    floor, ada = saved["results"]["floor"], saved["results"]["adalomo"]
    assert floor["ok"] and ada["ok"], (floor.get("error"), ada.get("error"))
    assert floor["memory_vs_floor"] == pytest.approx(1.0) and floor["time_vs_floor"] == pytest.approx(1.0)
    for key in ("peak_rss_gib", "s_per_step_median", "s_per_step_mean", "final_loss", "parameters"):
        assert ada[key] is not None
    assert ada["memory_vs_floor"] > 0 and ada["memory_vs_adamw"] is None  # AdamW was not run
    assert isinstance(saved["targets"]["adalomo_memory_met"], bool)
    assert saved["targets"]["adalomo_faster_than_adamw"] is None
    assert report["results"].keys() == saved["results"].keys()

    md = out.with_suffix(".md").read_text()
    assert "| AdaLomo (leantune) |" in md and "Targets for leantune AdaLomo" in md
    assert "AdaLomo (leantune)" in capsys.readouterr().out


def test_failures_are_reported_not_raised(bench, tmp_path, monkeypatch):
    # The worker raises (its traceback goes to stderr); the parent records the failure and carries on.
    with pytest.raises(ValueError, match="Unknown model preset 'nope'"):
        bench.run_worker({**_worker_params("floor"), "preset": "nope"})
    failed = {"error": "ValueError: Unknown model preset 'nope'", "detail": "Traceback ..."}
    monkeypatch.setattr(bench.benchlib, "run_matrix", lambda script, configs, **kw: {"floor": [failed]})
    out = tmp_path / "bad"
    report = bench.main(["--preset", "nope", "--only", "floor", "--out", str(out)])
    floor = report["results"]["floor"]
    assert not floor["ok"] and floor["label"] == "floor: fwd+bwd, grads dropped"
    assert "failed: `ValueError: Unknown model preset 'nope'" in out.with_suffix(".md").read_text()


def test_only_rejects_unknown_names_with_a_hint(bench):
    with pytest.raises(SystemExit, match=r"unknown configuration 'adalomoo'.*Did you mean 'adalomo'"):
        bench.main(["--only", "floor,adalomoo"])
