"""benchmarks/memory_by_size.py: the ``--quick`` sweep end to end on the ``tiny`` preset (fresh
subprocesses, report files and fields, ratios to the floor, a run skipped by the budget, a worker that
dies), ``--resume``, the predictions, and bad input."""

from __future__ import annotations

import importlib
import json

import pytest

DIES = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"  # like the OOM killer would


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("memory_by_size")  # benchmarks/ is on pytest's pythonpath


def _check(bench, preset: str, config: str, setting: str = "fp32", seq: int = 32) -> float:
    s = bench.parse_setting(setting)
    return bench.predict(preset, config, s.dtype, s.grad_checkpointing, seq, 1)["budget_check_gib"]


def test_quick_sweep_end_to_end(bench, tmp_path, monkeypatch, capsys):
    # A budget between the runs that go ahead and AdamW (whose two moments make it the largest).
    fits = max(_check(bench, "tiny", c) for c in ("floor", "sgd", "adalomo"))
    adamw = _check(bench, "tiny", "adamw")
    assert fits < adamw
    budget = (fits + adamw) / 2
    # SGD's worker is killed with SIGKILL (as by the OOM killer): recorded, and the sweep goes on.
    dies = tmp_path / "dies.py"
    dies.write_text(DIES)
    real = bench._run

    def run(params, timeout):
        if params["config"] == "sgd":
            return real(params, timeout, script=dies)
        return real(params, timeout)

    monkeypatch.setattr(bench, "_run", run)
    out = tmp_path / "mbs"
    argv = ["--quick", "--presets", "tiny", "--settings", "fp32", "--only", "floor,sgd,adalomo,adamw"]
    report = bench.main([*argv, "--budget", str(budget), "--out", str(out)])

    for ext in (".json", ".md", ".png"):
        assert out.with_suffix(ext).is_file(), ext
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["complete"] and saved["benchmark"] == "memory_by_size"
    assert saved["command"].startswith("python benchmarks/memory_by_size.py --quick")
    setup = saved["setup"]
    assert (setup["seq"], setup["threads"], setup["presets"], setup["budget_gib"]) == (
        32,
        1,
        ["tiny"],
        budget,
    )
    assert setup["settings"] == [
        {"name": "fp32", "label": setup["settings"][0]["label"], "dtype": "fp32", "grad_checkpointing": False}
    ]
    assert saved["presets"]["tiny"]["parameters"] > 0
    for key in ("torch", "cpu_model", "loadavg_before", "loadavg_after"):
        assert key in saved["machine"]

    runs = saved["results"]["fp32"]["tiny"]
    assert list(runs) == ["floor", "sgd", "adalomo", "adamw"]
    floor, sgd, ada, adamw = (runs[k] for k in ("floor", "sgd", "adalomo", "adamw"))
    assert floor["status"] == "ok" and ada["status"] == "ok", (floor.get("error"), ada.get("error"))
    assert floor["memory_vs_floor"] == pytest.approx(1.0) and floor["time_vs_floor"] == pytest.approx(1.0)
    assert ada["memory_vs_floor"] == pytest.approx(ada["peak_rss_gib"] / floor["peak_rss_gib"])
    assert ada["time_vs_floor"] == pytest.approx(ada["s_per_step_median"] / floor["s_per_step_median"])
    assert ada["parameters"] == saved["presets"]["tiny"]["parameters"]
    for r in (floor, ada):
        assert r["peak_rss_gib"] > 0 and r["s_per_step_median"] > 0 and r["wall_s"] > 0
        assert r["predicted_peak_gib"] == r["prediction"]["estimate_gib"] > 0
        assert r["prediction_error"] == pytest.approx(r["predicted_peak_gib"] / r["peak_rss_gib"] - 1)
        assert r["dtype"] == "fp32" and r["grad_checkpointing"] is False
    assert adamw["status"] == "skipped" and not adamw["ok"]
    assert adamw["error"] == f"skipped: predicted {_gib_text(adamw)} GiB > budget {budget:g} GiB"
    assert sgd["status"] == "failed" and sgd["error"] == "killed by SIGKILL (out of memory?)"
    assert report["results"] == saved["results"]

    md = out.with_suffix(".md").read_text()
    assert "| AdaLomo (leantune) | 0." in md and "| 1.00× |" in md
    assert "| AdamW (torch) | skipped (pred." in md and "| SGD (torch) | failed |" in md
    assert "SGD (torch) failed: `killed by SIGKILL (out of memory?)`" in md
    assert "![peak RSS against parameters](mbs.png)" in md
    err = capsys.readouterr().err
    assert "[1/4] tiny fp32 floor ..." in err and "[4/4] tiny fp32 adamw: skipped: predicted" in err


def _gib_text(r: dict) -> str:
    return f"{r['prediction']['budget_check_gib']:.2f}"


def _fake_result(params: dict) -> dict:
    size = {"test": 1.0, "tiny": 2.0}[params["preset"]]
    extra = {"floor": 0.0, "adalomo": 0.1, "adamw": 1.0}[params["config"]]
    return {
        "config": params["config"],
        "label": params["config"],
        "ok": True,
        "peak_rss_gib": size + extra,
        "process_peak_rss_gib": size + extra,
        "s_per_step_median": size * (1 + extra),
        "parameters": 123,
        "notes": [],
    }


def test_resume_reuses_successful_runs(bench, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["--quick", "--settings", "fp32,bf16+ckpt", "--only", "floor,adalomo,adamw", "--out", str(out)]
    calls: list[tuple] = []

    def first(params, timeout):
        calls.append((params["dtype"], params["grad_checkpointing"], params["preset"], params["config"]))
        if params["config"] == "adamw" and params["preset"] == "tiny":
            return {"config": "adamw", "label": "AdamW (torch)", "ok": False, "error": "timed out after 1 s"}
        return _fake_result(params)

    monkeypatch.setattr(bench, "_run", first)
    report = bench.main(argv)
    # Order: setting, then size, then optimizer; every run in a worker with the sweep's parameters.
    settings, presets, configs = (
        (("fp32", False), ("bf16", True)),
        ("test", "tiny"),
        ("floor", "adalomo", "adamw"),
    )
    assert calls == [(d, ck, p, c) for d, ck in settings for p in presets for c in configs]
    tiny = report["results"]["bf16+ckpt"]["tiny"]
    assert tiny["adamw"]["status"] == "failed" and tiny["adalomo"]["memory_vs_floor"] == pytest.approx(
        2.1 / 2.0
    )
    md = out.with_suffix(".md").read_text()
    assert md.count("## ") == 4  # two settings, notes, machine
    assert "| adamw | 2.00 | 2.00× | 2 | failed |  |  |" in md.replace("AdamW (torch)", "adamw")

    calls.clear()

    def second(params, timeout):
        calls.append((params["dtype"], params["preset"], params["config"]))
        return _fake_result(params)

    monkeypatch.setattr(bench, "_run", second)
    again = bench.main([*argv, "--resume"])
    assert calls == [("fp32", "tiny", "adamw"), ("bf16", "tiny", "adamw")]  # only the failed ones
    assert again["results"]["fp32"]["test"]["floor"]["reused"] is True
    assert again["results"]["fp32"]["tiny"]["adamw"]["status"] == "ok" and again["complete"]

    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--resume", "--seq", "64"])
    assert exc.value.code == 2


def test_predictions(bench):
    ada = bench.predict("0.37b", "adalomo", "fp32", False, 512, 1)
    peer = bench.predict("0.37b", "lomo_optim_adalomo", "fp32", False, 512, 1)
    adamw = bench.predict("0.37b", "adamw", "fp32", False, 512, 1)
    assert peer["estimator_optimizer"] == "adalomo" and peer["estimate_gib"] == ada["estimate_gib"]
    assert peer["budget_check_gib"] == pytest.approx(ada["budget_check_gib"] + peer["peer_margin_gib"])
    assert ada["peer_margin_gib"] == 0 and adamw["estimate_gib"] > 1.5 * ada["estimate_gib"]
    assert 0.3e9 < ada["parameters"] < 0.4e9 and ada["moment"]
    # 8b in bf16 is initialised in bf16 directly: construction never holds fp32 weights.
    big = bench.predict("8b", "adalomo", "bf16", True, 512, 1)
    assert big["build_gib"] < 2.1 * big["parameters"] / 1024**3 and big["budget_check_gib"] < 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--presets", "0.1b,0.37bb"], "unknown preset '0.37bb'. Did you mean '0.37b'?"),
        (["--only", "floor,adamww"], "unknown configuration 'adamww'. Did you mean 'adamw'?"),
        (["--settings", "fp16"], "unknown setting 'fp16'"),
        (["--settings", "bf16+ckpt,bf16+lora"], "unknown setting 'bf16+lora'"),
        (["--seq", "0"], "--seq must be >= 1"),
    ],
)
def test_bad_input_exits_2(bench, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written, nothing run
