"""benchmarks/rounding.py on the tiny ``test`` preset: the pre-train worker, then the fine-tune worker
for two configurations (fp32 and bf16 + stochastic rounding) in process, and the report built from
their results."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("rounding")  # benchmarks/ is on pytest's pythonpath


@pytest.fixture(scope="module")
def settings(bench, tmp_path_factory):
    args = bench.build_parser().parse_args(
        [
            "--preset", "test", "--pretrain-steps", "2", "--steps", "4", "--batch", "4",
            "--num-train", "64", "--num-eval", "8", "--eval-every", "2", "--measure-every", "2",
            "--memory-preset", "test", "--memory-seq", "16", "--memory-steps", "2", "--threads", "1",
            "--work", str(tmp_path_factory.mktemp("rounding")),
        ]
    )  # fmt: skip
    return bench._settings(args)


@pytest.fixture(scope="module")
def results(bench, settings):
    pretrain = bench.run_worker({"job": "pretrain", "settings": settings})
    runs = [
        bench.run_worker({"job": name, "settings": settings})
        for name in ("adalomo-fp32", "adalomo-bf16-stochastic")
    ]
    return pretrain, runs


def test_pretrain_is_evaluated_on_the_fine_tuning_eval_set(results, settings):
    pretrain, runs = results
    assert pretrain["steps"] == 2 and Path(pretrain["final_dir"], "config.json").is_file()
    assert {"eval_loss", "acc", "acc/add", "acc/reverse"} <= pretrain.keys()
    # phase 1 trains on reverse/sort/count but is scored on phase 2's held-out prompts (with add)
    train = Path(settings["work"], "pretrain_train.jsonl").read_text()
    assert '"task": "add"' not in train
    assert all(r["eval_set_matches_pretrain"] for r in runs)


def test_finetune_worker_fields(results, settings):
    _, runs = results
    fp32, sto = runs
    assert (fp32["dtype"], sto["dtype"], sto["rounding"]) == ("fp32", "bf16", "stochastic")
    for r in runs:
        assert r["steps"] == 4 and r["lr"] == settings["adalomo_lr"]
        for key in ("eval_loss_start", "eval_loss", "eval_ppl", "eval_loss_fp32_compute", "acc"):
            assert r[key] is not None and r[key] >= 0, key
        assert r["command"].startswith("leantune train ") and "optim.rounding=" in r["command"]
        # steps 0 and 2 are measured (snapshot + count), steps 1 and 3 timed
        assert [c["step"] for c in r["changed_per_step"]] == [1, 3]
        assert 0 < r["changed_fraction"] <= 1
        assert r["timed_steps"] == 2 and r["s_per_step"] > 0
        assert r["update_s_per_step"] > 0 and 0 < r["write_s_per_step"] <= r["update_s_per_step"]
        assert r["cpu_s_per_step"] > 0 and 0 < r["write_cpu_s_per_step"] <= r["update_cpu_s_per_step"]
        assert r["peak_rss_mib"] > 0 and r["parameters"] > 0
        assert [p[0] for p in r["eval_curve"]] == [0, 2, 4]
        assert r["eval_curve"][-1][1] == r["eval_loss"]
    # analytic bytes: bf16 weights are half of fp32's, stochastic rounding keeps no buffer
    assert sto["bytes"]["weights"] * 2 == fp32["bytes"]["weights"]
    assert sto["bytes"]["kahan"] == 0 and fp32["bytes"]["kahan"] == 0
    assert fp32["below_bf16_half_ulp_fraction"] >= 0


def test_memory_worker_fields(bench, settings):
    res = bench.run_worker({"job": "memory:lomo-bf16-kahan", "settings": settings})
    assert res["config"] == "lomo-bf16-kahan" and len(res["step_times_s"]) == 2
    assert res["bytes"]["kahan"] == res["bytes"]["weights"]  # a bf16 buffer as large as the bf16 weights
    assert res["peak_rss_mib"] > 0 and res["update_s_per_step"] > 0 and res["cpu_s_per_step"] > 0


def test_report_has_ratios_and_goals(bench, results, settings):
    pretrain, runs = results
    report = bench.summarize({**pretrain, "ok": True}, [{**r, "ok": True} for r in runs], [])
    sto = report["finetune"][1]
    assert sto["eval_loss_vs_fp32"] == pytest.approx(sto["eval_loss"] / runs[0]["eval_loss"])
    assert sto["cpu_s_per_step_vs_nearest"] is None  # bf16-nearest did not run
    assert report["goals"]["adalomo"]["loss_met"] in (True, False)
    report.update(
        settings=settings,
        total_seconds=1.0,
        command="python benchmarks/rounding.py",
        machine={
            "platform": "x",
            "cpu_model": "y",
            "cpus": 2,
            "load_before": [3.0, 3.0, 3.0],
            "load_after": None,
        },
    )
    md = bench.format_markdown(report)
    assert "| AdaLomo bf16 stochastic |" in md and "## Goal" in md and "machine was busy" in md
    assert "AdaLomo fp32" in bench.format_text_table(report)
