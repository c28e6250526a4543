"""benchmarks/mutation.py's report logic (the mutmut run itself is scripts/mutation, not CI): the
score, which survivors a note excuses, modules carried over from the report being replaced, and
the committed report rendering from its JSON."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def mutation():
    return importlib.import_module("mutation")  # benchmarks/ is on pytest's pythonpath


def _row(module, status, n, diff=""):
    return {"module": module, "mutant": f"{module}:{n}", "status": status, "diff": diff}


def test_the_score_leaves_out_judged_equivalent_and_unreached_mutants(mutation):
    a = "src/leantune/a.py"
    rows = [_row(a, "killed", i) for i in range(6)] + [_row(a, "timeout", 6)]
    rows += [_row(a, "survived", 7, "+    x = 2"), _row(a, "survived", 8, "+    y = None")]
    rows += [_row(a, "no tests", 9), _row(a, "not checked", 10)]
    notes = {
        f"{a}:7": {"diff": "x = 2", "status": "equivalent", "reason": "r"},
        f"{a}:8": {"diff": "y = 3", "status": "equivalent", "reason": "stale"},  # another diff
    }
    summary = mutation.summarise(rows, notes)
    counts = summary["modules"][a]
    assert counts["killed"] == 6 and counts["timeout"] == 1 and counts["equivalent"] == 1
    assert counts["survived"] == 1  # a note whose diff no longer matches excuses nothing
    assert counts["score"] == pytest.approx(7 / 8) and summary["total"]["score"] == pytest.approx(7 / 8)
    assert counts["measured_on"] == "this run"


def test_modules_this_run_did_not_mutate_are_carried_from_the_previous_report(mutation, tmp_path):
    fresh_mod, old_mod, other = "src/leantune/optim/a.py", "src/leantune/b.py", "src/leantune/c.py"
    older = "src/leantune/d.py"
    previous = {
        "date": "2026-12-02T22:43:38",
        "source": {"git_commit": "7e35d82", "digest": "x"},
        "rows": [_row(fresh_mod, "survived", 1), _row(old_mod, "killed", 2), _row(other, "killed", 3),
                 {**_row(older, "killed", 4), "measured_on": "1234567 (2026-11-30)"}],
    }  # fmt: skip
    path = tmp_path / "mutation.json"
    path.write_text(json.dumps(previous))
    rows = [_row(fresh_mod, "killed", 1)]
    carried, source = mutation.carry_over(rows, ["src/leantune/optim/*", old_mod, older], path)
    assert [(r["mutant"], r["measured_on"]) for r in carried] == [
        (f"{old_mod}:2", "7e35d82 (2026-12-02)"),
        (f"{older}:4", "1234567 (2026-11-30)"),  # carried twice: still named by its own run
    ]
    assert source == {"source": previous["source"], "date": previous["date"]}
    summary = mutation.summarise(rows + carried, {})
    assert summary["modules"][fresh_mod]["measured_on"] == "this run"
    assert summary["modules"][old_mod]["measured_on"] == "7e35d82 (2026-12-02)"
    assert summary["modules"][older]["measured_on"] == "1234567 (2026-11-30)"
    assert mutation.carry_over(rows, ["src/leantune/optim/*"], tmp_path / "none.json") == ([], None)


def test_the_committed_report_renders_from_its_json(mutation):
    report = json.loads((RESULTS / "mutation.json").read_text())
    assert mutation.format_markdown(report) == (RESULTS / "mutation.md").read_text()
