"""benchmarks/speculative.py: the report renders and the goals are judged from a results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

speculative = pytest.importorskip("speculative")

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "speculative.json"


@pytest.mark.skipif(not RESULTS.is_file(), reason="benchmark not run")
def test_render_and_goals_from_results_file():
    report = json.loads(RESULTS.read_text())
    goals = speculative.goals(report["results"])
    assert len(goals) == 4 + len(speculative.RATIOS)  # wall, virtual, 2 TTFT, gamma* per ratio
    assert all(("met" in g) for g in goals)
    md = speculative.render({**report, "goals": goals})
    assert md.startswith("# Speculative decoding") and "| duo-10 |" in md


def test_train_seconds_of_a_run_without_metrics(tmp_path):
    assert speculative._train_seconds(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"time": 10.0}\n{"time": 25.0}\n')
    assert speculative._train_seconds(tmp_path) == 15.0
    (tmp_path / "metrics.jsonl").write_text('{"time": 10.0}\n{"train_seconds": 99.5}\n')
    assert speculative._train_seconds(tmp_path) == 99.5
