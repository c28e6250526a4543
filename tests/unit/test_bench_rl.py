"""benchmarks/rl.py without running it: the data, the milestone reading, the configs (valid
leantune configs) and the report rendering on made-up results."""

from __future__ import annotations

import importlib
import json

import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("rl")  # benchmarks/ is on pytest's pythonpath


def test_data_is_the_task_and_held_out_words_are_unseen(bench, tmp_path):
    files = bench.make_data(tmp_path)
    train = [json.loads(x) for x in files["train"].read_text().splitlines()]
    held = [json.loads(x) for x in files["heldout"].read_text().splitlines()]
    assert len(train) == 6000 and len(held) == 200
    words = {r["prompt"].split()[1] for r in train}
    for r in held:
        word = r["prompt"].removeprefix("reverse ")
        assert word not in words and 6 <= len(word) <= 10 and set(word) <= set(bench.ALPHABET)
        assert r["response"] == word[::-1]


def test_first_at_reads_the_first_evaluation_at_the_target(bench):
    curve = [[2, 0.70], [4, 0.79], [6, 0.80], [8, 0.9]]
    assert bench.first_at(curve, 0.8) == 6
    assert bench.first_at(curve, 0.95) is None
    assert bench.first_at([], 0.5) is None


def test_every_speed_config_is_a_valid_ppo_config(bench, tmp_path):
    from leantune.config import load_config

    for name, extra in bench.SPEED.items():
        cfg = load_config(
            None, ["train.objective=ppo", "train.batch_size=64", "rl.minibatch_size=32", *extra]
        )
        assert cfg.train.objective == "ppo", name
    assert load_config(None, ["train.objective=ppo", *bench.SPEED["token-lambda1"]]).rl.lam == 1.0
    assert load_config(None, ["train.objective=ppo", *bench.SPEED["macro-n5"]]).rl.ngram == 5


def test_render_reports_milestones_medians_and_failures(bench):
    curve = [[2, 0.7], [4, 0.76], [6, 0.81]]
    runs = {f"{name}/seed{s}": {"curve": curve, "eval_reward": 0.81} for name in bench.SPEED for s in (0, 1)}
    runs["macro-n3/seed1"] = {"error": "boom", "detail": "boom"}
    report = {
        "speed": {
            "sft": {"acc": 0.8, "start_acc": 0.5, "start_step": 800},
            "runs": runs,
            "sft_steps": 1600,
            "iterations": 6,
            "seeds": [0, 1],
            "lr": 1e-3,
        },  # fmt: skip
        "memory": {"adalomo": {"peak_rss_mib": 1000.0}, "adamw": {"peak_rss_mib": 1500.0}},
    }
    text = bench.render(report)
    assert "| token | 6 / 6 | 6 | 4 / 4 | 4 | 0.700 | 0.810 | 0.757 |" in text
    assert "6 / failed" in text
    assert "1.50x" in text and "SFT step 800 of 1600" in text


def test_collect_reads_finished_runs_back_and_names_the_others(bench, tmp_path):
    import argparse

    runs = tmp_path / "runs"
    rows = {
        "sft": [
            {"kind": "eval", "step": 800, "acc": 0.5},
            {"kind": "summary", "step": 1600, "acc": 0.8, "peak_mem_bytes": 2**20, "train_seconds": 1.0},
        ],  # fmt: skip
        "token-seed0": [
            {"kind": "eval", "step": 2, "eval_reward": 0.7},
            {
                "kind": "summary",
                "step": 4,
                "eval_reward": 0.72,
                "peak_mem_bytes": 2**21,
                "train_seconds": 2.0,
            },
        ],  # fmt: skip
        "macro-n3-seed0": [{"kind": "eval", "step": 2, "eval_reward": 0.7}],  # killed before its summary
    }
    for name, records in rows.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = argparse.Namespace(work=tmp_path, seeds=[0], sft_steps=1600)
    found = bench.collect(args)
    assert found["sft"]["start_acc"] == 0.5 and found["sft"]["acc"] == 0.8
    token = found["runs"]["token/seed0"]
    assert token["curve"] == [[2, 0.7]] and token["eval_reward"] == 0.72 and token["peak_rss_mib"] == 2.0
    assert found["runs"]["macro-n3/seed0"]["error"] == "did not finish"
    assert found["runs"]["macro-n5/seed0"]["error"] == "not run"
