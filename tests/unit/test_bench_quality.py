"""benchmarks/quality.py --quick end to end (one fresh subprocess per optimizer, report files and
fields), and the best-lr selection on made-up results."""

from __future__ import annotations

import importlib
import json
import math

import pytest

OPTIMIZERS = ["adamw", "adalomo", "lomo", "adafactor", "sgd"]
COMPETITORS = ["galore", "apollo", "adam_mini", "badam", "adamw8bit", "adamw4bit"]


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("quality")  # benchmarks/ is on pytest's pythonpath


def test_every_optimizer_of_the_issue_is_compared(bench):
    assert tuple(OPTIMIZERS) == bench.DEFAULT
    assert list(bench.OPTIMIZERS) == OPTIMIZERS + list(COMPETITORS)
    assert all(len(o.lrs) == 3 for o in bench.OPTIMIZERS.values())


def test_every_competitor_run_is_a_valid_leantune_config(bench, tmp_path):
    from leantune.config import load_config

    settings = {"preset": "tiny", "tasks": bench.TASKS, "num_train": 100, "num_eval": 8, "steps": 10,
                "batch": 4, "warmup": 2, "eval_every": 5, "work": str(tmp_path)}  # fmt: skip
    for name in COMPETITORS:
        cfg = load_config(None, bench._overrides(settings, name, bench.OPTIMIZERS[name].lrs[1], 0))
        assert cfg.optim.name == name and cfg.optim.clip_grad_norm == 1.0
        assert cfg.optim.kwargs == ({"rank": 32} if name in ("galore", "apollo") else {})


def test_quick_run_writes_report(bench, tmp_path, capsys):
    out = tmp_path / "quality"
    report = bench.main(
        ["--quick", "--jobs", "2", "--threads", "1", "--out", str(out), "--work", str(tmp_path / "work")]
    )

    for ext in (".json", ".md", ".png"):
        assert out.with_suffix(ext).is_file(), ext
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["settings"]["quick"] and saved["settings"]["steps"] == bench.QUICK["steps"]
    runs = saved["runs"]
    assert [r["optimizer"] for r in runs] == OPTIMIZERS  # one lr each, no seed re-runs
    for r in runs:
        assert r["ok"], r.get("error")
        assert r["lr"] == bench.OPTIMIZERS[r["optimizer"]].lrs[1]
        assert r["steps"] == bench.QUICK["steps"] and math.isfinite(r["eval_loss"]) and r["eval_ppl"] > 1
        assert 0 <= r["acc"] <= 1 and {f"acc/{t}" for t in bench.TASKS} <= r.keys()
        assert [p[0] for p in r["eval_curve"]] == [5, 10] and r["eval_curve"][-1][1] == r["eval_loss"]
        assert r["s_per_step"] > 0 and r["step_seconds"] > 0 and r["cpu_s_per_step"] > 0
        assert r["command"].startswith("leantune train model.preset=tiny")
    assert saved["best"].keys() == set(OPTIMIZERS)
    gap = saved["adalomo_vs_adamw"]
    assert gap["eval_loss_diff"] == pytest.approx(
        saved["best"]["adalomo"]["eval_loss"] - saved["best"]["adamw"]["eval_loss"]
    )
    for key in ("load_before", "load_after", "cpus"):
        assert key in saved["machine"]
    md = out.with_suffix(".md").read_text()
    assert "Quick mode" in md and "| AdaLomo |" in md and "**AdaLomo vs AdamW**" in md
    assert report["best"].keys() == saved["best"].keys()
    assert "exact match all" in capsys.readouterr().out


def _run(opt, lr, loss, seed=0, ok=True):
    return {"optimizer": opt, "lr": lr, "seed": seed, "ok": ok, "eval_loss": loss, "acc": 0.5}


def test_best_lr_is_the_lowest_finite_eval_loss_and_edges_are_flagged(bench):
    grids = {"adamw": [1e-3, 3e-3, 1e-2], "adalomo": [0.01, 0.03, 0.1], "sgd": [0.1]}
    runs = [
        _run("adamw", 1e-3, 1.0),
        _run("adamw", 3e-3, 0.8),
        _run("adamw", 1e-2, math.nan),  # diverged
        _run("adamw", 3e-3, 0.1, seed=1),  # another seed never decides
        _run("adalomo", 0.01, 1.2),
        _run("adalomo", 0.03, 1.1, ok=False),
        _run("adalomo", 0.1, 0.9),
        _run("sgd", 0.1, 2.0),
    ]
    best = bench.select_best(runs, grids)
    assert (best["adamw"]["lr"], best["adamw"]["edge"]) == (3e-3, None)
    assert (best["adalomo"]["lr"], best["adalomo"]["edge"]) == (0.1, "highest")
    assert best["sgd"]["edge"] is None  # a one-point grid has no edge
    stats = bench.summarize(runs, grids)["seed_stats"]
    assert stats["adamw"]["seeds"] == [0, 1] and stats["adalomo"] is None


@pytest.mark.parametrize(
    ("lr", "down", "expected"),
    [
        (1e-3, True, 3e-4),
        (3e-4, True, 1e-4),
        (1e-2, False, 3e-2),
        (0.03, False, 0.1),
        (1.0, False, 3.0),
        (0.05, True, 0.01),
    ],
)
def test_grid_extends_along_the_1_3_10_ladder(bench, lr, down, expected):
    assert bench.next_lr(lr, down=down) == pytest.approx(expected)
