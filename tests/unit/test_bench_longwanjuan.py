"""benchmarks/longwanjuan.py: the report rendered from a small fake result, and from the committed one."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "longwanjuan"
CLASSES = ("holistic", "aggregated", "chaotic", "unscored")


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("longwanjuan")  # benchmarks/ is on pytest's pythonpath


def fake_result(correct: int) -> dict:
    kinds = ("holistic", "aggregated", "chaotic")
    confusion = {k: {c: 0 for c in CLASSES} for k in kinds}
    for k in kinds:
        confusion[k][k] = correct
        confusion[k]["aggregated" if k != "aggregated" else "chaotic"] += 4 - correct
    medians = {k: {"ppl_ratio": 0.1 * i, "word_ttr": 0.5} for i, k in enumerate(kinds)}
    return {"args": {"docs": 4, "steps": 10, "real": 2, "seed": 0}, "windows": [512, 128, 64],
            "train_seconds": 12.4, "score_seconds": 3.6, "train_loss_first_last": [5.55, 2.25],
            "accuracy": correct / 4, "confusion": confusion, "medians": medians, "real_docs": 2,
            "real_counts": {"holistic": 1, "aggregated": 0, "chaotic": 1, "unscored": 0},
            "real_examples": {"holistic": ["a-1.0.dist-info/LICENSE"], "aggregated": [],
                              "chaotic": ["b-2.0.dist-info/METADATA"], "unscored": []}}  # fmt: skip


def test_report_from_a_fake_result(bench):
    md = bench.render(fake_result(correct=3))
    assert "`python benchmarks/longwanjuan.py --docs 4 --steps 10 --real 2`" in md
    assert "loss 5.55 -> 2.25,\n  12 s. Windows (512, 128, 64); scoring 12 documents took 4 s." in md
    assert "## Synthetic documents: 3-way accuracy 75.0% (goal >= 90%: NOT met)" in md
    lines = md.splitlines()
    confusion = lines[lines.index("| true \\ predicted | holistic | aggregated | chaotic | unscored |") :][:5]
    assert confusion[2:] == [
        "| holistic | 3 | 1 | 0 | 0 |",
        "| aggregated | 0 | 3 | 1 | 0 |",
        "| chaotic | 0 | 1 | 3 | 0 |",
    ]
    assert "| chaotic | 0.200 | 0.500 |" in md  # medians, three decimals
    assert "| holistic | 1 | a-1.0.dist-info/LICENSE |" in md
    assert "## Real text: 2 package descriptions" in md
    assert "goal >= 90%: met" in bench.render(fake_result(correct=4))


def test_committed_report_renders_from_its_json(bench):
    result = json.loads(COMMITTED.with_suffix(".json").read_text())
    assert bench.render(result) == COMMITTED.with_suffix(".md").read_text()


def test_report_with_the_training_comparison(bench):
    result = fake_result(correct=4)
    result["args"].update(compare_steps=5, pool=3, eval_docs=2)
    run = {"recall": 0.25, "recall_digits": 8, "last_window_ppl": 3.456, "final_loss": 1.2345, "seconds": 9.6}
    result["comparison"] = {"steps": 5, "tokens": 20480, "pool": 3, "eval_docs": 2, "runs": {
        "raw mix": {**run, "weights": {}},
        "LongWanjuan (true classes)": {**run, "recall": 0.5,
                                       "weights": {"holistic": 0.25, "aggregated": 0.75}},
    }}  # fmt: skip
    md = bench.render(result)
    assert "--real 2 --compare-steps 5 --pool 3 --eval-docs 2`" in md
    assert "Not measured" not in md and "(20,480 tokens)" in md and "the 8 key digits" in md
    assert "| raw mix | uniform | 25.0% | 3.46 | 1.234 | 10 |" in md
    assert "| LongWanjuan (true classes) | holistic 0.25, aggregated 0.75 | 50.0% | 3.46 | 1.234 | 10 |" in md


def test_recall_counts_only_keys_stated_earlier_in_the_window(bench):
    window = "The key of box 17 is 4821. she opened box 17 again; its key was still 4821. " \
             "she opened box 30 again; its key was still 1111."  # fmt: skip
    at = window.index("4821", 30)
    assert bench.recall_positions(window) == list(range(at, at + 4))  # box 30's key was never stated


@pytest.mark.slow
def test_tiny_run_end_to_end(bench, tmp_path):
    out = tmp_path / "longwanjuan"
    argv = ["--docs", "2", "--steps", "2", "--real", "1", "--compare-steps", "2", "--pool", "2",
            "--eval-docs", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert sum(sum(r.values()) for r in res["confusion"].values()) == 6
    assert list(res["comparison"]["runs"]) == ["raw mix", "LongWanjuan (scorer's classes)",
                                               "LongWanjuan (true classes)"]  # fmt: skip
    assert res["comparison"]["tokens"] == 2 * 8 * 512
    assert out.with_suffix(".md").read_text() == bench.render(res)
