"""benchmarks/benchlib.py: the worker protocol (RESULT line, failures, timeouts) and provenance."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import benchlib


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_worker_returns_the_last_result_line_and_the_wall_time():
    code = (
        "import benchlib; print('noise'); benchlib.emit_result({'x': 1}); "
        "benchlib.emit_result({'x': 2, 'nested': [1.5, None]})"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(benchlib.__file__)}
    t0 = time.perf_counter()
    result = benchlib.run_worker(_python(code), env, "ok")
    outer = time.perf_counter() - t0
    assert result["x"] == 2 and result["nested"] == [1.5, None]
    assert 0 < result["process_wall_seconds"] <= outer  # the worker's own time, within the call's


@pytest.mark.parametrize(
    "code, reason",
    [
        ("import sys; sys.stderr.write('boom here'); sys.exit(3)", "failed (exit code 3)"),
        ("print('no result')", "printed no RESULT line"),
        # a result followed by a crash is still a failure: the worker did not finish
        ("print('RESULT {}'); raise SystemExit(1)", "failed (exit code 1)"),
    ],
)
def test_run_worker_failures_name_the_worker_and_keep_stderr(code, reason):
    with pytest.raises(benchlib.WorkerError) as exc:
        benchlib.run_worker(_python(code), dict(os.environ), "job-7")
    err = exc.value
    assert isinstance(err, RuntimeError)
    assert err.label == "job-7" and err.reason == reason
    assert str(err).startswith(f"worker job-7 {reason}")
    if "boom" in code:
        assert "boom here" in err.stderr and "boom here" in str(err)
        assert err.last_line == "boom here" and err.detail == "boom here"


def test_run_worker_timeout():
    with pytest.raises(benchlib.WorkerError, match="timed out after 1 s") as exc:
        benchlib.run_worker(_python("import time; time.sleep(30)"), dict(os.environ), "slow", timeout=1)
    # no stderr: the reason stands for both
    assert exc.value.last_line == exc.value.detail == "timed out after 1 s"


def test_machine_and_load():
    m = benchlib.machine()
    import torch

    assert m["torch"] == torch.__version__ and m["cpus"] == os.cpu_count()
    assert m["cpu_model"] and m["python"].count(".") == 2
    assert m["ram_gib"] is None or m["ram_gib"] > 0.1
    load = benchlib.loadavg()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load))
    assert benchlib.format_load([0.5, 1.25, 2.0]) == "0.50 / 1.25 / 2.00"
    assert benchlib.format_load(None) == "?"


def test_source_identifies_the_code(tmp_path):
    src = benchlib.source()
    import leantune

    assert src["package"] == os.path.dirname(os.path.abspath(leantune.__file__))
    assert len(src["digest"]) == 16 and benchlib.source()["digest"] == src["digest"]  # stable
    in_git = subprocess.run(["git", "-C", src["package"], "rev-parse"], capture_output=True).returncode == 0
    assert (src["git_commit"] is not None) == in_git


def test_source_note():
    assert benchlib.source_note(None) == "- Code: unknown."
    clean = {"package": "/x/leantune", "digest": "abcd", "git_commit": "1234567", "uncommitted": []}
    assert benchlib.source_note(clean) == "- Code: leantune from git 1234567; source digest `abcd`."
    dirty = {**clean, "uncommitted": [f"f{i}.py" for i in range(10)]}
    note = benchlib.source_note(dirty)
    assert "uncommitted changes in 10 file(s)" in note and "`f7.py`, ..." in note and "f8.py" not in note
    loose = {"package": "/x/leantune", "digest": "abcd", "git_commit": None}
    assert "`/x/leantune` (not a git checkout)" in benchlib.source_note(loose)


def test_run_options_are_shared_and_checked_naming_the_option():
    import argparse

    ap = argparse.ArgumentParser()
    benchlib.add_run_options(ap, ["a", "b"], steps=3, warmup=1, timeout=60.0, preset="test")
    args = ap.parse_args([])
    assert (args.preset, args.seq, args.batch, args.steps, args.warmup) == ("test", 512, 1, 3, 1)
    assert (args.repeats, args.threads, args.timeout, args.only, args.worker) == (1, 2, 60.0, None, None)
    benchlib.check_run_options(ap.parse_args(["--warmup", "0"]))  # no warmup is allowed
    for bad, message in (("--seq=0", "--seq must be >= 1"), ("--repeats=0", "--repeats must be >= 1"),
                         ("--warmup=-1", "--warmup must be >= 0")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            benchlib.check_run_options(ap.parse_args([bad]))


WORKER = """
import json, os, sys
import benchlib
params = json.loads(sys.argv[sys.argv.index("--worker") + 1])
if params.get("die"):
    sys.stderr.write("allocating\\n")
    sys.stderr.flush()
    os.kill(os.getpid(), 9)  # as the OOM killer would
with open("/proc/self/oom_score_adj") as f:
    oom = int(f.read())
benchlib.emit_result({"x": params["x"], "oom": oom, "threads": os.environ.get("OMP_NUM_THREADS")})
"""


def test_run_one_returns_the_result_or_the_failure_and_sets_oom_score(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {"PYTHONPATH": os.path.dirname(benchlib.__file__), **benchlib.thread_env(3)}
    res = benchlib.run_one(script, {"x": 5}, env=env, oom_score_adj=1000)
    assert (res["x"], res["oom"], res["threads"]) == (5, 1000, "3") and res["process_wall_seconds"] > 0
    # killed by a signal: the reason first, then the worker's last words
    died = benchlib.run_one(script, {"die": True}, env=env)
    assert died == {"error": "killed by SIGKILL (out of memory?): allocating", "detail": "allocating\n"}


@pytest.mark.parametrize(
    ("returncode", "reason"),
    [
        (3, "failed (exit code 3)"),
        (-9, "killed by SIGKILL (out of memory?)"),
        (-6, "killed by SIGABRT"),
        (-200, "killed by signal 200"),
    ],
)
def test_exit_reason(returncode, reason):
    assert benchlib.exit_reason(returncode) == reason


@pytest.mark.parametrize(("a", "b", "expected"), [(3.0, 2.0, 1.5), (None, 2.0, None), (3.0, None, None),
                                                  (3.0, 0.0, None), (0.0, 2.0, 0.0)])  # fmt: skip
def test_ratio_is_none_without_both_numbers(a, b, expected):
    assert benchlib.ratio(a, b) == expected


def test_write_report_is_atomic_and_keeps_the_indent(tmp_path):
    out = tmp_path / "sub" / "report"
    benchlib.write_report(out, {"a": [1], "é": 1}, "# md\n", indent=1)
    assert out.with_suffix(".json").read_text() == '{\n "a": [\n  1\n ],\n "\\u00e9": 1\n}\n'
    assert out.with_suffix(".md").read_text() == "# md\n"
    benchlib.write_report(out, {"é": 1}, "# again\n", ensure_ascii=False)
    assert out.with_suffix(".json").read_text() == '{\n  "é": 1\n}\n'
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.json", "report.md"]  # no .tmp left


def test_load_average_is_formatted(monkeypatch):
    monkeypatch.setattr(benchlib, "loadavg", lambda: [0.5, 1.25, 2.0])
    assert benchlib.load_average() == "0.50 / 1.25 / 2.00"


def test_work_dir_is_kept_when_given_else_temporary(tmp_path):
    given, keep = benchlib.work_dir(tmp_path / "a" / "b", "x")
    assert (given, keep) == (tmp_path / "a" / "b", True) and given.is_dir()
    temp, keep = benchlib.work_dir(None, "unit")
    try:
        assert not keep and temp.is_dir() and temp.name.startswith("leantune-unit-")
    finally:
        temp.rmdir()
