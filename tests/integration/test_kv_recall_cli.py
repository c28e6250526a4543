"""The recall task end to end: ``leantune train data.tasks=[recall]`` on a tiny model, then
``leantune eval --task recall`` with and without a KV-cache policy, and its bad inputs."""

from __future__ import annotations

import json
import re

import pytest

from leantune.cli import main
from leantune.data.tasks import RECALL_LENGTH, RECALL_QUERIES

QUICK = [
    "model.preset=test",
    "data.tasks=[recall]",
    f"data.max_length={RECALL_LENGTH + 8}",
    "data.num_train=64",
    "data.num_eval=8",
    "train.batch_size=4",
    "train.max_steps=3",
    "optim.warmup_steps=0",
    "eval.every=0",
    "eval.accuracy_samples=4",
    "log.progress=false",
    "log.tensorboard=false",
    "log.plot=false",
]


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    assert main(["train", *QUICK, f"train.output_dir={root}", "train.run_name=r"]) == 0
    return root / "r"


def test_train_on_recall_then_eval_recall(recall_run, tmp_path, capsys):
    out = tmp_path / "res" / "recall.json"
    argv = ["eval", str(recall_run), "--task", "recall", "--lengths", "64,128", "--samples-per-cell", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recall (full): 3 prompts x 2 queries per length" in text
    res = json.loads(out.read_text())
    assert res["lengths"] == [64, 128] and res["queries"] == RECALL_QUERIES
    assert len(res["records"]) == 6 and res["tokens"] == [65.0, 129.0]
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"])
    # under eviction: the kept cache is a fifth of the prompt (13 of 65 tokens)
    kv = [
        "--kv-policy",
        "nacl",
        "--kv-budget",
        "0.2",
        "--kv-sink",
        "1",
        "--kv-recent",
        "4",
        "--kv-proxies",
        "4",
    ]
    assert main([*argv[:4], "--lengths", "64", "--samples-per-cell", "2", *kv, "--out", str(out)]) == 0
    nacl = json.loads(out.read_text())
    assert nacl["policy"] == "nacl 0.2"
    assert nacl["kv_bytes"][0] == pytest.approx(res["kv_bytes"][0] * 13 / 65)
    # queries after eviction: the prefill holds bos, 60 characters of filler and pairs and the newline
    assert main([*argv[:4], "--lengths", "64", "--samples-per-cell", "2", *kv, "--late-queries",
                 "--out", str(out)]) == 0  # fmt: skip
    late = json.loads(out.read_text())
    assert late["late_queries"] is True and late["tokens"] == [62.0]
    assert "queries after eviction" in capsys.readouterr().out
    # defaults: 1, 2, 4 and 8 times the task's length, the run directory
    assert main(["eval", str(recall_run), "--task", "recall", "--samples-per-cell", "1", "--pairs", "2",
                 "--queries", "1"]) == 0  # fmt: skip
    res = json.loads((recall_run / "recall.json").read_text())
    assert res["lengths"] == [RECALL_LENGTH * k for k in (1, 2, 4, 8)] and res["queries"] == 1


@pytest.mark.parametrize(("extra", "message"), [
    (["--task", "recall", "--lengths", "8"], "cannot hold 4 pairs and 2 queries"),
    (["--task", "recall", "--pairs", "2", "--queries", "3"], "queries (3) must not exceed pairs (2)"),
    (["--task", "default", "--pairs", "3"],
     "--pairs / --queries / --late-queries apply to --task recall, not --task default"),
    (["--task", "passkey", "--late-queries"],
     "--pairs / --queries / --late-queries apply to --task recall, not --task passkey"),
    (["--task", "position-ppl", "--kv-policy", "streaming", "--kv-budget", "8"],
     "--kv-policy streaming applies to --task passkey and recall, not --task position-ppl"),
    (["--task", "recall", "--kv-policy", "nacl", "--kv-budget", "0.1"], "below --kv-sink + --kv-recent"),
])  # fmt: skip
def test_eval_recall_bad_input_is_a_clear_error(recall_run, capsys, extra, message):
    assert main(["eval", str(recall_run), *extra, "--samples-per-cell", "1"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--pairs", "--queries", "--samples-per-cell"])
def test_eval_recall_counts_must_be_positive(recall_run, capsys, option):
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(recall_run), "--task", "recall", option, "0"])
    assert exc.value.code == 2
    assert re.search(rf"{option}: must be >= 1, got 0", capsys.readouterr().err)


def test_unknown_option_and_unknown_task_family(recall_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(recall_run), "--task", "recall", "--recall-pairs", "3"])
    assert "unrecognized arguments: --recall-pairs" in capsys.readouterr().err
    argv = ["train", *QUICK, "data.tasks=[recal]", f"train.output_dir={tmp_path}"]
    assert main(argv) == 2
    assert (
        "data.tasks must name built-in tasks (add, reverse, sort, count, recall, copy), got ['recal'] (did "
        "you mean 'recall'?)" in capsys.readouterr().err
    )
