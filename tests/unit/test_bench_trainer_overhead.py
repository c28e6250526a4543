"""benchmarks/trainer_overhead.py end to end on a few steps: both loops run, the report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trainer_overhead.py"


def test_trainer_overhead_writes_rates_ratio_and_figure(tmp_path):
    out = tmp_path / "overhead"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["rates"]) == {"plain", "leantune"}
    assert all(len(v) == 1 and v[0] > 0 for v in data["rates"].values())
    assert abs(data["ratio"] - data["rates"]["leantune"][0] / data["rates"]["plain"][0]) < 1e-9
    text = out.with_suffix(".md").read_text()
    assert "leantune / plain" in text and "batch 64" in text
    assert out.with_suffix(".png").stat().st_size > 1000


def test_trainer_overhead_rejects_bad_arguments():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "many"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "invalid int value" in proc.stderr
