"""benchmarks/longctx_extrapolation.py: its argument checks, a two-base run end to end at T = 128 with
a few steps, and the report re-rendered from the committed results."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "longctx_extrapolation.json"


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("longctx_extrapolation")  # benchmarks/ is on pytest's pythonpath


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--factors", "2,4"], "--factors must start at 1"),  # T is the reference of every comparison
        (["--factors", "1"], "at least two values"),
        (["--factors", "1,4,2"], "--factors must start at 1 and increase"),
        (["--factors", "1,x"], "--factors takes integers"),
        (["--depths", "0,2"], "--depths must be fractions in [0, 1]"),
    ],
)
def test_bad_arguments_are_clear_errors(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_two_bases_end_to_end(bench, tmp_path, capsys):
    out = tmp_path / "longctx"
    argv = [
        "--train-len", "128", "--bases", "10000,20", "--factors", "1,2", "--steps", "3", "--batch", "2",
        "--tokens", "30000", "--skip-memory", "--samples-per-cell", "1", "--depths", "0,1", "--jobs", "2",
        "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["base"] for r in res["runs"]] == [10000.0, 20.0]
    for r in res["runs"]:
        assert list(r["window_nll"]) == ["1-128", "128-256"]
        assert set(r["answer_digit_accuracy"]) == {"128", "256"}
        assert len(r["passkey"]["accuracy"]) == 2 and len(r["passkey"]["accuracy"][0]) == 2
    # base 20 turns every rotary pair within T: no bound; base 10000 has one
    by_base = {p["base"]: p for p in res["predictions"]}
    assert by_base[20.0]["critical_period"] is None
    assert by_base[10000.0]["critical_period"] > 128
    text = out.with_suffix(".md").read_text()
    assert "| 10000 |" in text and "| 20 |" in text and "## Observations" in text
    assert "in [128, 256) vs [1, 128)" in text
    for suffix in ("_ppl.png", "_passkey.png"):
        assert (tmp_path / f"longctx{suffix}").stat().st_size > 1000


def test_committed_results_render_unchanged(bench, tmp_path):
    """The committed report is what ``--render`` makes of the committed JSON (the report is current)."""
    out = tmp_path / "longctx"
    assert bench.main(["--render", str(COMMITTED), "--out", str(out)]) == 0
    committed = COMMITTED.with_suffix(".md").read_text()
    assert out.with_suffix(".md").read_text() == committed
    assert (tmp_path / "longctx_memory.png").stat().st_size > 1000


def _args(bench, tmp_path):
    values = {k: 1 for k in bench.WORKER_OPTIONS} | {"lr": 0.05, "factors": [1, 2], "depths": [0.0, 1.0]}
    return argparse.Namespace(**values, work=tmp_path, threads=1)


def test_worker_specs_are_json_with_every_option(bench, tmp_path):
    args = _args(bench, tmp_path)
    ext = bench.worker_spec(args, "extrapolation", base=10000.0)
    mem = bench.worker_spec(args, "memory", seq=256, ckpt=False)
    for spec in (ext, mem, bench.worker_spec(args, "memory-model")):
        assert json.loads(json.dumps(spec)) == spec  # what benchlib.run_one passes as --worker JSON
        assert {"worker", "work", "factors", "depths", *bench.WORKER_OPTIONS} <= set(spec)
    assert (ext["base"], ext["factors"], ext["depths"], ext["lr"]) == (10000.0, [1, 2], [0.0, 1.0], 0.05)
    assert (mem["seq"], mem["ckpt"]) == (256, False)


def test_only_memory_workers_get_the_fixed_mmap_threshold(bench, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        bench.benchlib,
        "run_one",
        lambda script, spec, *, label, env: seen.setdefault(label, env) and {"process_wall_seconds": 0.0},
    )
    args = _args(bench, tmp_path)
    for worker in ("extrapolation", "memory", "memory-model"):
        bench._run(args, bench.worker_spec(args, worker), worker)
    assert {k for k, env in seen.items() if "MALLOC_MMAP_THRESHOLD_" in env} == {"memory"}
    assert all(env["OMP_NUM_THREADS"] == "1" for env in seen.values())


def test_failed_worker_ends_the_benchmark_with_its_error(bench, tmp_path):
    args = _args(bench, tmp_path)
    with pytest.raises(SystemExit, match=r"(?s)worker odd failed: .*unknown worker 'odd'"):
        bench._run(args, bench.worker_spec(args, "odd"), "odd")
