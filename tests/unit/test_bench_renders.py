"""The committed benchmark reports are what their scripts render from the committed JSON, byte for
byte: a change to a script's report code (or to ``benchlib``) that would alter a committed report
fails here, and a committed report older than its script's rendering is visible here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# results stem -> (script module, render function, what main appends to its output)
CASES = {
    "allocator": ("allocator", "render", ""),
    "competitors_0.37b_bf16": ("competitors", "format_markdown", ""),
    "competitors_0.37b_fp32": ("competitors", "format_markdown", ""),
    "competitors_1b_fp32": ("competitors", "format_markdown", ""),
    "estimate_families": ("estimate_families", "format_markdown", "\n"),
    "estimate_validation": ("estimate_validation", "format_markdown", "\n"),
    "families": ("families", "format_markdown", ""),
    "memory_by_size": ("memory_by_size", "format_markdown", ""),
    "optim_step": ("optim_step", "format_markdown", ""),
    "optim_step_vs_lomo_optim": ("optim_step", "format_markdown", ""),
    "quality": ("quality", "format_markdown", ""),
    "quality_competitors": ("quality", "format_markdown", ""),
    "rounding": ("rounding", "format_markdown", ""),
    "rounding_time_quiet": ("rounding", "format_markdown", ""),
    "speculative": ("speculative", "render", ""),
    "scale_demo": ("scale_demo", "format_markdown", ""),
    "forgetting": ("forgetting", "_markdown", ""),
}


@pytest.mark.parametrize("stem", list(CASES))
def test_committed_report_renders_unchanged(stem):
    module, function, tail = CASES[stem]
    render = getattr(importlib.import_module(module), function)
    report = json.loads((RESULTS / f"{stem}.json").read_text())
    assert render(report) + tail == (RESULTS / f"{stem}.md").read_text()


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({"source": {"git_commit": "abc1234", "uncommitted": ["optim/engine.py"]}}, ("abc1234", True)),
        ({"source": {"git_commit": "abc1234", "uncommitted": []}}, ("abc1234", False)),
        ({"source": {"package": "/x", "digest": "0" * 16}}, ("?", False)),  # not a git checkout
        ({"git": {"commit": "04858746cd31c5b2", "dirty_sources": ["M src/a.py"]}}, ("04858746cd", True)),
        ({}, ("?", False)),
    ],
)
def test_estimate_reports_name_their_commit_old_and_new(report, expected):
    ev = importlib.import_module("estimate_validation")
    assert ev.commit_of(report) == expected
