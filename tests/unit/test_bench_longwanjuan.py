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


def fake_result(correct: int, held: int | None = None) -> dict:
    kinds = ("holistic", "aggregated", "chaotic")

    def confusion(right: int) -> dict:
        out = {k: {c: 0 for c in CLASSES} for k in kinds}
        for k in kinds:
            out[k][k] = right
            out[k]["aggregated" if k != "aggregated" else "chaotic"] += 4 - right
        return out

    held = correct if held is None else held
    medians = {k: {"ppl_ratio": 0.1 * i, "word_ttr": 0.5} for i, k in enumerate(kinds)}
    spread = {k: [0.1 * i - 0.01, 0.1 * i, 0.1 * i + 0.01] for i, k in enumerate(kinds)}
    return {"args": {"docs": 4, "steps": 10, "real": 2, "seed": 0, "heldout_seed": 1, "threads": 1,
                     "cache_windows": 16}, "windows": [512, 128, 64],
            "train_seconds": 12.4, "score_seconds": 3.6, "train_loss_first_last": [5.55, 2.25],
            "cache": {"positions": 8176, "matched": 6132, "nll_gain": 0.01234, "seconds": 1.2},
            "accuracy": correct / 4, "confusion": confusion(correct), "medians": medians,
            "ppl_ratio_spread": spread,
            "lm_alone": {"accuracy": 1 / 3, "confusion": confusion(0), "ppl_ratio_spread": spread},
            "heldout": {"seed": 1, "accuracy": held / 4, "confusion": confusion(held)}, "real_docs": 2,
            "real_counts": {"holistic": 1, "aggregated": 0, "chaotic": 1, "unscored": 0},
            "real_examples": {"holistic": ["a-1.0.dist-info/LICENSE"], "aggregated": [],
                              "chaotic": ["b-2.0.dist-info/METADATA"], "unscored": []}}  # fmt: skip


def test_report_from_a_fake_result(bench):
    md = bench.render(fake_result(correct=3, held=4))
    assert "`python benchmarks/longwanjuan.py --docs 4 --steps 10 --real 2`" in md
    assert "loss 5.55 -> 2.25,\n  12 s; mixed with an induction cache whose gate was fitted on 16" in md
    assert "(75% of their positions have an earlier match; the cache lowers the windows' mean nll" in md
    assert "by\n  0.0123 nats per token), 1 s." in md
    assert "Windows (512, 128, 64); scoring 12 documents took 4 s. 1 thread(s)." in md
    assert "3-way accuracy 75.0% (seed 0) and 100.0% (seed 1) (goal >= 90%: NOT met)" in md
    lines = md.splitlines()
    seed0 = lines.index("Documents of seed 0:")
    assert lines[seed0 + 4 : seed0 + 7] == [
        "| holistic | 3 | 1 | 0 | 0 |",
        "| aggregated | 0 | 3 | 1 | 0 |",
        "| chaotic | 0 | 1 | 3 | 0 |",
    ]
    seed1 = lines.index(
        "Documents of seed 1 (a second draw, for checking that the rules are not fitted to the first):"
    )
    assert lines[seed1 + 4] == "| holistic | 4 | 0 | 0 | 0 |"
    assert "| chaotic | 0.200 | 0.500 |" in md  # medians, three decimals
    assert "would then sort 33.3% of the documents correctly):" in md
    assert "| aggregated | 0.090 | 0.100 | 0.110 | 0.090 | 0.100 | 0.110 |" in md
    assert "| holistic | 1 | a-1.0.dist-info/LICENSE |" in md
    assert "## Real text: 2 package descriptions" in md
    assert "goal >= 90%: met" in bench.render(fake_result(correct=4))
    assert "goal >= 90%: NOT met" in bench.render(fake_result(correct=4, held=3))  # both draws count
    other = fake_result(correct=4)
    other["args"].update(seed=3, heldout_seed=7)
    assert "--real 2 --seed 3 --heldout-seed 7`" in bench.render(other)


def test_induction_copies_what_followed_the_longest_earlier_match(bench):
    ids = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]
    # position 10 ends "1 2 3", which ended at 2 (then 9) and 6 (then 7); position 8's "7 1" is new
    # as a pair, its "1" was followed by 2 twice
    assert bench.induction(ids, 8) == [(1, [2, 2]), (2, [3, 3]), (3, [9, 7])]
    assert bench.induction([5, 6, 7], 0) == [(0, []), (0, []), (0, [])]  # nothing repeats
    assert [bench.match_bucket(m) for m in (1, 2, 4, 5, 6, 47, 48, 500)] == [0, 1, 3, 3, 4, 9, 10, 10]


def test_the_cache_mixes_the_copy_distribution_by_its_gate(bench):
    import torch

    from tests.helpers import byte_llama

    lm = byte_llama(40, 1, seed=0).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7]])  # the last 7 followed 5 6 before: copy 8
    n = len(bench.MATCH_EDGES)
    with torch.no_grad():
        plain = torch.log_softmax(lm(input_ids=ids).logits.float(), -1)
    closed = bench.InductionCache(lm, {"hidden": [0.0] * 32, "match": [-100.0] * n})
    assert torch.allclose(closed(ids).logits, plain, atol=1e-5)  # gate shut: the LM alone
    opened = bench.InductionCache(lm, {"hidden": [0.0] * 32, "match": [100.0] * n})
    out = opened(ids, logits_to_keep=2).logits  # the last two positions: after "6" and after "7"
    assert out.shape == (1, 2, 40)
    assert out[0, 0].exp()[7].item() == pytest.approx(1.0) and out[0, 1].exp()[8].item() == pytest.approx(1.0)
    half = bench.InductionCache(lm, {"hidden": [0.0] * 32, "match": [0.0] * n})  # lambda = 0.5
    p = half(ids).logits[0, -1].exp()
    assert p[8].item() == pytest.approx(0.5 + 0.5 * plain[0, -1, 8].exp().item(), abs=1e-5)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)


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
    argv = ["--docs", "2", "--steps", "2", "--real", "1", "--cache-windows", "8", "--compare-steps", "2",
            "--pool", "2", "--eval-docs", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert sum(sum(r.values()) for r in res["confusion"].values()) == 6
    assert sum(sum(r.values()) for r in res["heldout"]["confusion"].values()) == 6
    assert res["heldout"]["seed"] == 1 and res["cache"]["matched"] <= res["cache"]["positions"] == 8 * 511
    assert list(res["comparison"]["runs"]) == ["raw mix", "LongWanjuan (scorer's classes)",
                                               "LongWanjuan (true classes)"]  # fmt: skip
    assert res["comparison"]["tokens"] == 2 * 8 * 512
    assert out.with_suffix(".md").read_text() == bench.render(res)
