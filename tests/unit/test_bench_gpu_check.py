"""scripts/gpu-check: its dry run end to end (what CI runs without a GPU) and its pieces."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_dry_run_passes_every_section_and_writes_the_report(tmp_path):
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--dry-run", "--out", str(tmp_path), "--work", str(tmp_path / "w")],  # noqa: E501
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["gpu"] is None
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    assert all(s["ok"] for s in report["sections"].values())
    s = report["sections"]
    assert s["tests"]["collected"] >= 100  # the CUDA variants exist and are selected by -m cuda
    assert s["default_job"]["last_loss"] < s["default_job"]["first_loss"]
    assert s["fsdp_offload"]["rc"] == 0  # FSDP2 in one process, without torchrun
    assert len(s["memory"]["rows"]) == 6 and all(r["finite"] for r in s["memory"]["rows"])
    assert {r["name"] for r in s["throughput"]["rows"]} >= {"adalomo", "adamw"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (dry run)") and "| memory | ok |" in md


def test_without_a_gpu_it_asks_for_the_dry_run(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_an_unknown_section_is_refused_with_a_hint():
    with pytest.raises(SystemExit, match="Did you mean 'memory'"):
        gpu_check.main(["--dry-run", "--only", "memroy"])


def test_longest_fitting_seq_is_the_last_multiple_under_the_budget():
    budget = gpu_check.estimate("1b", "adalomo", 8192, True)["total"]
    seq = gpu_check.longest_fitting_seq("1b", budget, 1024)
    assert seq == 8192
    below = gpu_check.longest_fitting_seq("1b", budget - 1, 1024)
    assert below == 7168


def _row(allocated: float, estimate: float) -> dict:
    check = gpu_check.Check.__new__(gpu_check.Check)  # _compare uses no instance state
    params = {"preset": "1b", "config": "adalomo", "seq": 2048, "ckpt": True}
    est = gpu_check.estimate("1b", "adalomo", 2048, True)["without_overhead"]
    result = {
        "max_allocated": est / estimate * allocated,
        "max_reserved": est / estimate * allocated * 1.1,
        "device_used": est / estimate * allocated * 1.1 + 5e8,
        "finite": True,
    }
    return check._compare("x", params, result)


@pytest.mark.parametrize(
    ("allocated", "estimate", "ok"),
    [(1.0, 1.0, True), (1.0, 0.91, True), (1.0, 0.89, False), (1.0, 1.24, True), (1.0, 1.26, False)],
)
def test_memory_check_fails_an_estimate_far_below_or_above_the_peak(allocated, estimate, ok):
    row = _row(allocated, estimate)
    assert row["estimate_over_allocated"] == pytest.approx(estimate / allocated)
    assert row["ok"] is ok
    assert row["context_measured"] == pytest.approx(5e8)


def test_a_failed_worker_is_a_failed_row_and_the_report_names_it():
    check = gpu_check.Check.__new__(gpu_check.Check)
    params = {"preset": "8b", "config": "adamw", "seq": 2048, "ckpt": False}
    row = check._compare("8b adamw", params, {"error": "torch.OutOfMemoryError: CUDA out of memory"})
    assert row["ok"] is False
    report = {
        "dry_run": False,
        "machine": {"torch": "t", "transformers": "x", "python": "3.12"},
        "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "cuda": "13.0"},
        "packages": {"torch": "2.11"},
        "sections": {"memory": {"ok": False, "seconds": 3.0, "seq": 2048, "rows": [row]}},
    }
    md = gpu_check.render(report)
    assert "| memory | **FAILED** | 3 |" in md
    assert "**FAILED** torch.OutOfMemoryError" in md


def test_junit_counts_reads_passed_failed_and_the_failing_names(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="a" name="t1"/><testcase classname="a" name="t2"><failure/></testcase>'
        '<testcase classname="a" name="t3"><skipped/></testcase><testcase classname="a" name="t4"/>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (2, 1, 1)
    assert counts["failed_tests"] == ["a::t2"]
    assert gpu_check.junit_counts(tmp_path / "missing.xml")["passed"] == 0


def test_the_worker_runs_one_configuration_in_process():
    out = gpu_check.step_worker(
        {"preset": "test", "config": "adalomo", "dtype": "bf16", "seq": 32, "batch": 2, "ckpt": True,
         "warmup": 1, "steps": 1, "device": "cpu", "loss_chunk": 16}
    )  # fmt: skip
    assert out["finite"] and len(out["losses"]) == 2 and out["tokens_per_s"] > 0
    assert "max_allocated" not in out  # CUDA peaks only on CUDA
