"""benchmarks/benchlib.py's run matrix and Markdown tables, and benchmarks/competitors.py: every
configuration's worker in process, the parent end to end on the ``tiny`` preset, failures in the table."""

from __future__ import annotations

import importlib
import json
import textwrap

import pytest

import benchlib

# Spelled out rather than read from the script, so that a new configuration needs a test here.
CONFIG_NAMES = [
    "floor",
    "adalomo",
    "lomo",
    "adamw",
    "galore",
    "adam_mini",
    "apollo",
    "badam",
    "adamw8bit",
    "adamw4bit",
]

WORKER = """
import json, os, sys
params = json.loads(sys.argv[sys.argv.index("--worker") + 1])
if params.get("fail"):
    sys.stderr.write("some noise\\nRuntimeError: no kernel for " + params["fail"] + "\\n")
    sys.exit(2)
if params.get("garbled"):
    print("RESULT {not json")
else:
    print("RESULT " + json.dumps({"x": params["x"], "var": os.environ.get("BENCH_TEST_VAR")}))
"""


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("competitors")  # benchmarks/ is on pytest's pythonpath


def test_run_matrix_repeats_and_records_failures(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    configs = {"a": {"x": 1}, "broken": {"fail": "cpu"}, "garbled": {"garbled": True}, "b": {"x": 2}}
    lines: list[str] = []
    runs = benchlib.run_matrix(script, configs, repeats=2, progress=lines.append, env={"BENCH_TEST_VAR": "v"})

    assert list(runs) == ["a", "broken", "garbled", "b"] and all(len(r) == 2 for r in runs.values())
    for name, x in (("a", 1), ("b", 2)):
        for r in runs[name]:
            assert r["x"] == x and r["var"] == "v" and r["process_wall_seconds"] > 0
    assert runs["broken"] == [runs["broken"][0]] * 2
    assert runs["broken"][0]["error"] == "RuntimeError: no kernel for cpu"  # the last stderr line
    assert "some noise" in runs["broken"][0]["detail"]
    assert runs["garbled"][0]["error"].startswith("JSONDecodeError")
    # one line per run, the rounds interleaved
    assert len(lines) == 8 and lines[0].startswith("[1/8] a (repeat 1/2): ok")
    assert lines[1].startswith("[2/8] broken (repeat 1/2): FAILED: RuntimeError: no kernel for cpu")
    assert lines[4].startswith("[5/8] a (repeat 2/2): ok")


def test_run_matrix_timeout_and_single_repeat(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time; time.sleep(30)\n")
    lines: list[str] = []
    runs = benchlib.run_matrix(script, {"slow": {}}, timeout=1, progress=lines.append)
    assert runs == {"slow": [{"error": "timed out after 1 s", "detail": "timed out after 1 s"}]}
    assert lines[0].startswith("[1/1] slow: FAILED: timed out after 1 s")
    assert benchlib.run_matrix(script, {}, progress=None) == {}
    with pytest.raises(ValueError, match="repeats"):
        benchlib.run_matrix(script, {"slow": {}}, repeats=0)


def test_render_table():
    table = benchlib.render_table(
        ["name", "GiB", "x"], [["a|b", "1.50", "ok"], ["c", "12.00", "two\nlines"]], "lrc"
    )
    assert table == (
        "| name | GiB | x |\n| --- | ---: | :---: |\n| a\\|b | 1.50 | ok |\n| c | 12.00 | two lines |\n"
    )
    assert benchlib.render_table(["a", "b"], []) == "| a | b |\n| --- | --- |\n"
    with pytest.raises(ValueError, match="align"):
        benchlib.render_table(["a", "b"], [], "l")
    with pytest.raises(ValueError, match="align"):
        benchlib.render_table(["a"], [], "x")
    with pytest.raises(ValueError, match="row has 1 cells"):
        benchlib.render_table(["a", "b"], [["1"]])


def test_every_configuration_is_tested(bench):
    assert list(bench.CONFIGS) == CONFIG_NAMES


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_worker_runs_every_configuration(bench, name):
    params = {**bench.CONFIGS[name], "preset": "test", "vocab_size": None, "dtype": "fp32", "seq": 16,
              "batch": 1, "steps": 2, "warmup": 1, "threads": 1}  # fmt: skip
    res = bench.run_worker(params)
    assert len(res["step_times_s"]) == 3 and res["s_per_step"] > 0 and res["peak_rss_gib"] > 0
    assert res["parameters"] > 0 and len(res["losses"]) == 3
    assert (res["optimizer_class"] is None) == (name == "floor")
    if name != "floor":  # every optimizer changes the weights, so the loss moves
        assert res["losses"][-1] != res["losses"][0]
    json.dumps(res)  # the RESULT line


def test_parent_end_to_end(bench, tmp_path, capsys):
    out = tmp_path / "comp.md"
    argv = ["--preset", "tiny", "--seq", "64", "--steps", "1", "--warmup", "0", "--threads", "1"]
    report = bench.main([*argv, "--only", "floor,adamw,adamw8bit", "--out", str(out)])

    saved = json.loads(out.with_suffix(".json").read_text())
    assert list(saved["results"]) == ["floor", "adamw", "adamw8bit"] == list(report["results"])
    floor, adamw, q8 = (saved["results"][n] for n in ("floor", "adamw", "adamw8bit"))
    assert "error" not in floor and "error" not in adamw and "error" not in q8, (floor, adamw, q8)
    assert floor["memory_vs_floor"] == pytest.approx(1.0) and floor["time_vs_floor"] == pytest.approx(1.0)
    assert adamw["memory_vs_adamw"] == pytest.approx(1.0) and q8["memory_vs_adamw"] > 0
    assert q8["package"].startswith("torchao ") and adamw["package"].startswith("torch ")
    assert floor["package"] == "–" and q8["optimizer_class"] == "torchao.optim.adam.AdamW8bit"
    # the workers ran under leantune train's glibc mmap threshold
    assert {r["malloc_mmap_threshold"] for r in saved["results"].values()} == {"1048576"}
    assert saved["setup"]["env"]["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    assert saved["command"].startswith("python benchmarks/competitors.py --preset tiny")

    md = out.read_text()
    assert md.startswith("# Optimizer competitors: tiny fp32, seq 64, batch 1\n")
    assert "| optimizer | package/version | peak RSS GiB | s/step |" in md
    assert "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |" in md
    assert "| floor | – |" in md and "| adamw8bit | torchao " in md and "MALLOC_MMAP_THRESHOLD_=1048576" in md
    assert "- Code: leantune from" in md
    assert md in capsys.readouterr().out


def test_failures_are_rows_not_exceptions(bench, tmp_path, monkeypatch):
    def fake_matrix(script, configs, **kwargs):
        assert list(configs) == ["floor", "galore"] and configs["galore"]["kwargs"] == {"rank": 256}
        ok = {"peak_rss_gib": 2.0, "s_per_step": 1.0, "loss": 5.0}
        return {"floor": [ok, {**ok, "peak_rss_gib": 4.0}, {**ok, "peak_rss_gib": 3.0}],
                "galore": [ok, {"error": "RuntimeError: no CPU kernel", "detail": "..."}, ok]}  # fmt: skip

    monkeypatch.setattr(bench.benchlib, "run_matrix", fake_matrix)
    out = tmp_path / "bad.md"
    report = bench.main(["--preset", "tiny", "--only", "floor,galore", "--repeats", "3", "--out", str(out)])
    floor, galore = report["results"]["floor"], report["results"]["galore"]
    assert floor["peak_rss_gib"] == 3.0 and floor["memory_vs_adamw"] is None  # median; no AdamW run
    assert galore["error"] == "RuntimeError: no CPU kernel" and galore["memory_vs_floor"] is None
    md = out.read_text()
    assert (
        "| galore | galore-torch " in md
        and "| – | – | – | – | – | – | failed: `RuntimeError: no CPU kernel` |" in md
    )


def test_only_rejects_unknown_names_with_a_hint(bench):
    with pytest.raises(SystemExit, match=r"unknown configuration 'galor'.*Did you mean 'galore'"):
        bench.main(["--only", "floor,galor"])
