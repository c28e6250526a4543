"""``leantune data inspect``: format, counts, length histogram, truncation under the config, and
rendered examples with the loss mask; errors are one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

from leantune.cli import main
from leantune.commands.data import MARK_CLOSE, MARK_OPEN, histogram

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "formats"


def test_histogram_counts_every_length_once_and_marks_max_length():
    lines = histogram([1, 2, 3, 8, 9, 16], limit=9, bins=4, width=4)
    # bins of 4: 1-4 (3), 5-8 (1), 9-12 (1), 13-16 (1)
    assert lines == [
        "       1-4            3  ####",
        "       5-8            1  #",
        "       9-12           1  #  <- max_length",
        "      13-16           1  #",
    ]


def test_inspect_shows_format_lengths_truncation_and_the_loss_mask(capsys):
    code = main(["data", "inspect", str(FIXTURES / "alpaca.jsonl"), "--set", "data.max_length=20"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == f"{FIXTURES / 'alpaca.jsonl'}: 3 records, format alpaca (trained as chat)"
    assert "token lengths (data.max_length=20):" in out
    # the history example loses its last answer to truncation: all its trained tokens, so dropped
    assert "under the current config: 3 records -> 2 sequences" in out
    assert "2 truncated to max_length; 1 dropped with every label masked" in out
    # the first example: the prompt as text, the answer and its eos between the marks
    assert f"<|assistant|>{MARK_OPEN}5</s>{MARK_CLOSE}" in out
    assert out.count("example ") == 3


def test_inspect_with_columns_packing_and_a_drop_policy(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": "x" * i}) + "\n" for i in range(1, 30)))
    argv = ["data", "inspect", str(path), "--examples", "1", "--set", "data.columns={prompt: q, response: a}",
            "data.max_length=32", "data.overlong=drop", "data.pack=true"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "29 records, format instruction" in out and out.count("example ") == 1
    assert "dropped as longer than max_length" in out
    assert "samples packed into" in out


def test_inspect_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    assert main(["data", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leantune data inspect: ") and "bad.jsonl:1: cannot tell the data format" in err
    assert main(["data", "inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "inspect", str(bad), "--set", "data.formt=text"]) == 2
    assert "Did you mean 'data.format'?" in capsys.readouterr().err
