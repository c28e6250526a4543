"""benchmarks/scale_demo.py: the ``--quick`` demo end to end on the ``test``/``tiny`` presets (fresh
subprocesses: the AdaLomo step, the largest AdamW size under the budget, the next size up run with
``--try-oom`` under an address-space limit and recorded as failed), runs skipped by the budget, the
AdamW size ladder, and bad input."""

from __future__ import annotations

import importlib
import json
import math

import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("scale_demo")  # benchmarks/ is on pytest's pythonpath


def _check(bench, preset: str, config: str, dtype: str) -> float:
    pred = bench.memory_by_size.predict(preset, config, dtype, True, 32, 1)
    return pred["budget_check_gib"]


def test_quick_demo_end_to_end(bench, tmp_path, capsys):
    # A budget that admits AdaLomo on tiny and AdamW on test, but not AdamW on tiny.
    fits = max(_check(bench, "tiny", "adalomo", "bf16"), _check(bench, "test", "adamw", "fp32"))
    too_big = _check(bench, "tiny", "adamw", "fp32")
    assert fits < too_big
    budget = (fits + too_big) / 2
    out = tmp_path / "demo"
    argv = ["--quick", "--adamw-dtypes", "fp32", "--budget", str(budget), "--try-oom", "--out", str(out)]
    report = bench.main(argv)

    for ext in (".json", ".md", ".png"):
        assert out.with_suffix(ext).is_file(), ext
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["complete"] and saved["benchmark"] == "scale_demo"
    assert saved["command"] == "python benchmarks/scale_demo.py " + " ".join(argv)
    setup = saved["setup"]
    assert (setup["preset"], setup["adamw_presets"], setup["seq"], setup["threads"]) == (
        "tiny", ["test", "tiny"], 32, 1
    )  # fmt: skip
    assert setup["oom_limit_gib"] == budget and setup["try_oom"]

    # (a) one AdaLomo step: bf16, checkpointing, no warmup, in a fresh worker.
    ada = saved["adalomo"]
    assert ada["ok"] and ada["status"] == "ok", ada.get("error")
    assert ada["params"] == {
        "config": "adalomo", "preset": "tiny", "dtype": "bf16", "seq": 32, "batch": 1, "steps": 1,
        "warmup": 0, "threads": 1, "grad_checkpointing": True,
    }  # fmt: skip
    assert ada["weight_dtype"] == "bfloat16" and ada["grad_checkpointing"] and len(ada["step_times_s"]) == 1
    assert math.isfinite(ada["final_loss"]) and ada["build_s"] > 0 and ada["s_per_step_median"] > 0
    assert ada["process_peak_rss_gib"] >= ada["peak_rss_gib"] > 0
    assert ada["predicted_peak_gib"] == ada["prediction"]["estimate_gib"] > 0
    assert ada["parameters"] == ada["prediction"]["parameters"]

    # (b) AdamW: test measured, tiny does not fit; --try-oom ran it under the limit and it died.
    part = saved["adamw"]["fp32"]
    assert (part["largest_fitting"], part["next_size_up"]) == ("test", "tiny")
    assert [e["role"] for e in part["ladder"]] == ["largest fitting", "next size up"]
    assert part["run"]["ok"] and part["run"]["params"]["preset"] == "test", part["run"].get("error")
    assert part["run"]["params"]["dtype"] == "fp32" and part["run"]["params"]["grad_checkpointing"]
    oom = part["try_oom"]
    assert not oom["ok"] and oom["status"] == "failed" and oom["error"]
    assert oom["outcome"] == "died as expected" and oom["params"]["address_space_limit_gib"] == budget
    summary = saved["summary"]
    assert (
        summary["adamw_fp32"]["largest_preset"] == "test" and summary["adamw_fp32"]["next_preset"] == "tiny"
    )
    assert summary["adamw_fp32"]["next_predicted_gib"] > budget
    assert summary["adamw_fp32"]["adalomo_size_ratio"] == pytest.approx(
        ada["parameters"] / part["run"]["parameters"]
    )
    assert summary["adalomo"]["preset"] == "tiny" and summary["adalomo"]["fits_device"]
    assert report["summary"] == summary

    md = out.with_suffix(".md").read_text()
    assert "## (a) AdaLomo: one full-parameter step of `tiny`" in md
    assert "**does not fit** (predicted" in md and "`--try-oom`: died as expected" in md
    assert "| fp32 | `test` |" in md and "**measured**" in md
    err = capsys.readouterr().err
    assert "AdaLomo: tiny bf16 ..." in err and "AdamW (--try-oom): tiny fp32 ... FAILED" in err


def test_runs_above_the_budget_are_skipped(bench, tmp_path, monkeypatch):
    def no_run(params, timeout):
        raise AssertionError(f"should not run {params}")

    monkeypatch.setattr(bench, "_run", no_run)
    out = tmp_path / "skip"
    report = bench.main(["--quick", "--adamw-dtypes", "fp32,mixed", "--budget", "0.1", "--out", str(out)])
    ada = report["adalomo"]
    assert ada["status"] == "skipped" and ada["error"].startswith("skipped: predicted ")
    assert ada["error"].endswith("GiB > budget 0.1 GiB")
    for dtype in ("fp32", "mixed"):
        part = report["adamw"][dtype]
        assert part["largest_fitting"] is None and part["run"] is None and part["try_oom"] is None
        assert part["next_size_up"] == "test"  # nothing fits: the smallest is the next size up
    md = out.with_suffix(".md").read_text()
    assert "| `tiny` | 804 K | bf16 | on | 32 × 1 | skipped |" in md
    assert "- AdamW, fp32: no measured size; `test` does not fit" in md
    assert json.loads(out.with_suffix(".json").read_text())["complete"]


def test_adamw_ladder(bench):
    presets = ["8b", "0.37b", "3b", "1b", "0.5b", "7b"]  # sorted by size in the ladder
    part = bench.adamw_ladder(presets, "fp32", 512, 1, 22.0)
    sizes = [e["parameters"] for e in part["ladder"]]
    assert sizes == sorted(sizes)
    # On a 24 GiB machine AdamW fits 1b (17 GiB predicted) and not 3b (51 GiB): AdaLomo trains 8b.
    assert (part["largest_fitting"], part["next_size_up"]) == ("1b", "3b")
    assert [e["fits"] for e in part["ladder"]] == [True, True, True, False, False, False]
    assert bench.adamw_ladder(["test", "tiny"], "fp32", 32, 1, 100.0)["next_size_up"] is None
    ada = bench.memory_by_size.predict("8b", "adalomo", "bf16", True, 512, 1)
    assert ada["budget_check_gib"] < 22.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "8bb"], "unknown preset '8bb'. Did you mean '8b'?"),
        (["--adamw-presets", "0.37b,1bb"], "unknown preset '1bb'"),
        (["--adamw-dtypes", "fp32,fp16"], "--adamw-dtypes: unknown 'fp16'"),
        (["--parts", "adalomo,lora"], "--parts: unknown 'lora'"),
        (["--budget", "0"], "must be > 0"),
    ],
)
def test_bad_input_exits_2(bench, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
