"""benchmarks/forgetting.py end to end on the tiny ``test`` preset: stage 1, two stage-2 configurations
(full AdaLomo and HFT + AdaLomo), one learning-rate sweep point and the memory runs, each in its own
subprocess, then the report."""

from __future__ import annotations

import argparse
import importlib
import json

import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("forgetting")  # benchmarks/ is on pytest's pythonpath


def test_unknown_configuration_is_a_clear_error(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "full_adalomo,hft_adalom"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown configuration(s) ['hft_adalom']" in err and "hft_adalomo" in err


def test_two_configurations_end_to_end(bench, tmp_path):
    out = tmp_path / "forgetting"
    argv = [
        "--preset", "test", "--steps-a", "3", "--steps-b", "3", "--batch", "4", "--eval-samples", "4",
        "--max-new-tokens", "4", "--only", "full_adalomo,hft_adalomo", "--sweep", "hft_adalomo",
        "--sweep-lrs", "0.01", "--memory-preset", "test", "--memory-seq", "16", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert 0.0 <= res["stage1"]["acc_a"] <= 1.0
    full, hft = res["stage2"]
    assert (full["config"], hft["config"]) == ("full_adalomo", "hft_adalomo")
    # HFT freezes about half of the parameters; full fine-tuning trains all of them
    assert full["trainable_parameters"] == full["total_parameters"]
    assert 0.3 < hft["trainable_parameters"] / hft["total_parameters"] < 0.7
    assert [(r["config"], r["lr"]) for r in res["sweep"]] == [("hft_adalomo@0.01", 0.01)]
    assert [m["config"] for m in res["memory"]] == ["full_adalomo", "hft_adalomo"]
    assert all(m["peak_rss_mib"] > 0 for m in res["memory"])
    assert res["machine"]["cpus"] and res["machine"]["load_before"]
    text = out.with_suffix(".md").read_text()
    assert "| full FT, AdaLomo | 0.05 | 100.0% |" in text and "HFT + AdaLomo" in text
    assert "## Learning rate sweep" in text and "## Memory and time on a larger model" in text
    assert out.with_suffix(".png").stat().st_size > 1000


def _args(bench, tmp_path, **over):
    values = {k: 1 for k in bench.WORKER_OPTIONS} | {"work": tmp_path, "threads": 1} | over
    return argparse.Namespace(**values)


def test_worker_spec_is_json_with_every_option(bench, tmp_path):
    spec = bench.worker_spec(
        _args(bench, tmp_path, task_a="reverse", memory_preset="0.1b"), "hft_adalomo@0.02"
    )
    assert json.loads(json.dumps(spec)) == spec  # what benchlib.run_one passes as --worker JSON
    assert set(spec) == {"worker", "work", *bench.WORKER_OPTIONS}
    assert (spec["worker"], spec["work"], spec["task_a"], spec["memory_preset"]) == (
        "hft_adalomo@0.02", str(tmp_path), "reverse", "0.1b",
    )  # fmt: skip


def test_failed_worker_ends_the_benchmark_with_its_error(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"(?s)worker memory:nope failed: .*KeyError: 'nope'"):
        bench._run(_args(bench, tmp_path), "memory:nope")
