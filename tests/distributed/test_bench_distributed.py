"""benchmarks/distributed.py end to end on the tiny preset: 1 and 2 ranks, ddp and fsdp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"


def test_distributed_benchmark_reports_every_configuration(tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, str(SCRIPT), "--preset", "test", "--seq", "32", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["strategy"], r["ranks"], r["optim"]) for r in rows] == [
        ("none", 1, "adalomo"),
        ("ddp", 2, "adalomo"),
        ("fsdp", 2, "adalomo"),
        ("none", 1, "adamw"),
        ("ddp", 2, "adamw"),
        ("fsdp", 2, "adamw"),
    ]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    by = {(r["strategy"], r["optim"]): r for r in rows}
    for optim in ("adalomo", "adamw"):
        # fsdp shards the weights: each of two ranks holds about half
        assert by[("fsdp", optim)]["param_gib_per_rank"] < 0.6 * by[("none", optim)]["param_gib_per_rank"]
        assert by[("ddp", optim)]["param_gib_per_rank"] == by[("none", optim)]["param_gib_per_rank"]
        assert all(r["tokens_per_s"] > 0 for r in rows)
    text = out.with_suffix(".md").read_text()
    assert text.count("| adalomo |") == 3 and text.count("| adamw |") == 3
    assert out.with_suffix(".png").stat().st_size > 1000
