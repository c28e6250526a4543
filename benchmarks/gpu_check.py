"""The CUDA paths of leantune, run on a real GPU, in one command (``scripts/gpu-check``).

Sections, each a check that passes or fails (the script exits 1 if one fails):

1. ``tests``: the CUDA variants of the device-parametrised tests (``pytest -m cuda``): the optimizer
   oracles in fp32/bf16, fp16 with dynamic loss scaling, stochastic rounding and its noise table,
   clipping, accumulation, resume, the device-side non-finite checks, the chunked loss.
2. ``default_job``: ``leantune train train.device=cuda`` (the built-in default job) must learn.
3. ``fsdp_offload``: FSDP2 on one rank over NCCL with bf16 mixed precision and CPU offload.
4. ``big_step``: one AdaLomo step of the 8B shape in bf16 with activation checkpointing at seq 4096
   and at the longest sequence ``leantune estimate --device cuda`` says fits (capped by ``--max-seq``
   to keep the run short).
5. ``memory``: peak CUDA memory (``max_memory_allocated``/``max_memory_reserved``) of AdamW,
   AdaLomo and LOMO on the 1b and 8b shapes, with and without checkpointing, against the
   estimator; it fails where the estimate is more than 10% below the allocated peak (a job the
   estimator says fits would not) or more than 25% above it.
6. ``throughput``: tokens/s of AdaLomo, AdamW and lomo-optim's AdaLomo on the 1b shape.

``--dry-run`` runs the same code on the CPU at toy sizes (the ``test`` preset, a few steps; the
tests are only collected), so that CI keeps the script working without a GPU. Each measurement runs
in a fresh worker process (:func:`benchlib.run_matrix`), so one configuration's peak or crash does
not leak into the next. The report (``gpu_check.md`` + ``.json`` in ``--out``) is rewritten after
each section: a run cut short still leaves what it measured.

    scripts/gpu-check --out benchmarks/results            # on a machine with a GPU (~6 minutes on an H200)
    scripts/gpu-check --dry-run --out /tmp/gpu-check      # anywhere (~1 minute on 2 CPU cores)
    scripts/gpu-check --only memory,throughput            # some sections
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import benchlib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GIB = 1024**3
SECTIONS = ("tests", "default_job", "fsdp_offload", "big_step", "memory", "throughput")
OPTIMIZERS = ("adamw", "adalomo", "lomo")  # optim_step.CONFIGS keys with an estimator model
THROUGHPUT = ("adalomo", "adamw", "lomo_optim_adalomo")
# The estimate may sit this far from the measured allocated peak (fractions of the measurement).
UNDER, OVER = 0.10, 0.25


# ------------------------------------------------------------------------------------- the worker
def step_worker(p: dict[str, Any]) -> dict[str, Any]:
    """A few training steps of one configuration: ``preset``, ``config`` (an
    ``optim_step.CONFIGS`` key), ``dtype``, ``seq``, ``batch``, ``ckpt``, ``warmup``, ``steps``,
    ``device``, ``loss_chunk``. Returns times, losses and the CUDA peaks (None on the CPU)."""
    import torch
    from transformers import LlamaForCausalLM

    from leantune.loss import training_loss
    from leantune.models import count_parameters, preset_config, resolve_dtype
    from optim_step import CONFIGS, _make_update, enable_checkpointing

    dev = torch.device(p["device"])
    cuda = dev.type == "cuda"
    cfg = preset_config(p["preset"])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(resolve_dtype(p["dtype"]))
    try:
        with dev:  # initialised where it trains: no host copy of an 8B model
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    model.train()
    if p["ckpt"]:
        enable_checkpointing(model)
    loss_fn, warning = training_loss(model, p["loss_chunk"], device=dev)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (p["batch"], p["seq"]), generator=gen).to(dev)
    batch = {"input_ids": ids, "labels": ids}
    update, notes = _make_update(CONFIGS[p["config"]], model)
    if warning:
        notes.append(warning)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        ready = torch.cuda.memory_allocated(dev)
    times, losses = [], []
    for _ in range(p["warmup"] + p["steps"]):
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(model, batch)
        update(loss)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        del loss
    timed = times[p["warmup"] :]
    tokens = p["batch"] * p["seq"]
    out: dict[str, Any] = {
        "parameters": count_parameters(model),
        "step_s": times,
        "tokens_per_s": tokens * len(timed) / sum(timed) if timed else None,
        "losses": losses,
        "finite": all(x == x and abs(x) != float("inf") for x in losses),
        "notes": notes,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info(dev)
        out.update(
            max_allocated=torch.cuda.max_memory_allocated(dev),
            max_reserved=torch.cuda.max_memory_reserved(dev),
            ready_allocated=ready,
            # Everything this process holds on the device (nothing else runs there): the CUDA
            # context and libraries' workspaces on top of the caching allocator's reserve.
            device_used=total - free,
            device_total=total,
        )
    return out


# ------------------------------------------------------------------------------------- estimates
def estimate(preset: str, optimizer: str, seq: int, ckpt: bool, dtype: str = "bf16") -> dict[str, Any]:
    """What ``leantune estimate --device cuda`` says of one configuration (bytes)."""
    from leantune.estimate import ModelShape, TrainSetup, estimate_memory

    setup = TrainSetup(optimizer=optimizer, seq_len=seq, dtype=dtype, grad_checkpointing=ckpt, device="cuda")
    m = estimate_memory(ModelShape.from_preset(preset), setup)
    return {
        "total": m.total,
        "overhead": m.overhead,
        "without_overhead": m.total - m.overhead,
        "moment": m.moment,
    }


def longest_fitting_seq(preset: str, budget: int, step: int) -> int:
    """The longest multiple of ``step`` at which the estimate of AdaLomo (bf16, checkpointing)
    fits ``budget`` bytes (bisection: the estimate grows with the sequence)."""
    lo, hi = 0, step
    while estimate(preset, "adalomo", hi, True)["total"] <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if estimate(preset, "adalomo", mid, True)["total"] <= budget else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------- sections
class Check:
    """Runs the sections and keeps the report, rewritten after each one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        # the jobs' run directories: out of the report directory (benchmarks/results by default)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.report: dict[str, Any] = {
            "dry_run": self.dry,
            "machine": benchlib.machine(),
            "gpu": gpu_info(),
            "packages": packages(),
            "source": benchlib.source(),
            "sections": {},
        }
        self.t_start = time.perf_counter()

    # helpers
    def log(self, msg: str) -> None:
        print(f"[gpu-check {time.perf_counter() - self.t_start:6.1f} s] {msg}", flush=True)

    def record(self, name: str, ok: bool, seconds: float, **data: Any) -> None:
        self.report["sections"][name] = {"ok": ok, "seconds": round(seconds, 1), **data}
        self.log(f"{name}: {'ok' if ok else 'FAILED'} ({seconds:.1f} s)")
        self.write()

    def write(self) -> None:
        self.report["wall_s"] = round(time.perf_counter() - self.t_start, 1)
        benchlib.write_report(self.out / "gpu_check", self.report, render(self.report))

    def workers(self, configs: dict[str, dict[str, Any]], timeout: float) -> dict[str, dict[str, Any]]:
        runs = benchlib.run_matrix(Path(__file__), configs, timeout=timeout, progress=self.log)
        return {name: r[0] for name, r in runs.items()}

    def cli(self, args: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "leantune", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            cwd=self.work,
        )
        return proc.returncode, (proc.stdout + proc.stderr)[-3000:]

    # 1
    def tests(self) -> None:
        t0 = time.perf_counter()
        xml = self.work / "pytest-cuda.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q"]
        cmd += ["tests/unit", "tests/reliability", "tests/integration"]
        if self.dry:
            cmd.append("--collect-only")
        else:
            cmd += ["-n", str(self.args.workers), f"--junitxml={xml}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=self.args.tests_timeout)
        (self.work / "pytest-cuda.log").write_text(proc.stdout + proc.stderr)
        tail = (proc.stdout + proc.stderr)[-4000:]
        if self.dry:
            collected = sum(1 for line in proc.stdout.splitlines() if "::" in line)
            ok = proc.returncode == 0 and collected >= 100
            self.record("tests", ok, time.perf_counter() - t0, collected=collected, tail=tail[-800:])
            return
        counts = junit_counts(xml)
        ok = proc.returncode == 0 and counts.get("passed", 0) > 0
        self.record("tests", ok, time.perf_counter() - t0, **counts, tail=tail)

    # 2
    def default_job(self) -> None:
        t0 = time.perf_counter()
        args = ["train", f"train.device={self.device}", "train.output_dir=runs", "train.run_name=default"]
        if self.dry:
            args += ["train.max_steps=10", "log.every=1"]
        rc, tail = self.cli(args, timeout=900)
        data: dict[str, Any] = {"rc": rc, "command": "leantune " + " ".join(args)}
        ok = rc == 0
        if ok:
            data.update(run_summary(self.work / "runs" / "default"))
            # Learning: the loss falls by a third over the full job (20 dry-run steps: at all).
            first, last = data["first_loss"], data["last_loss"]
            ok = last < first * (0.98 if self.dry else 0.67)
        else:
            data["tail"] = tail
        self.record("default_job", ok, time.perf_counter() - t0, **data)

    # 3
    def fsdp_offload(self) -> None:
        t0 = time.perf_counter()
        args = ["train", "dist.nproc=1", "dist.strategy=fsdp", f"train.device={self.device}"]
        args += ["train.output_dir=runs", "train.run_name=fsdp", "train.max_steps=30", "log.every=5"]
        if not self.dry:  # CPU offload and bf16 mixed precision need CUDA
            args += ["dist.cpu_offload=true", "dist.mixed_precision=bf16"]
        rc, tail = self.cli(args, timeout=600)
        data: dict[str, Any] = {"rc": rc, "command": "leantune " + " ".join(args)}
        ok = rc == 0
        if ok:
            data.update(run_summary(self.work / "runs" / "fsdp"))
            ok = data["last_loss"] < data["first_loss"]
        else:
            data["tail"] = tail
        self.record("fsdp_offload", ok, time.perf_counter() - t0, **data)

    def _config(
        self, preset: str, config: str, seq: int, ckpt: bool, steps: int, warmup: int
    ) -> dict[str, Any]:
        return {
            "worker": "step",
            "preset": preset,
            "config": config,
            "dtype": "bf16",
            "seq": seq,
            "batch": 1,
            "ckpt": ckpt,
            "warmup": warmup,
            "steps": steps,
            "device": self.device,
            "loss_chunk": 256,
        }

    def _compare(self, name: str, params: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        opt = params["config"]
        est = estimate(params["preset"], opt, params["seq"], params["ckpt"])
        row: dict[str, Any] = {"name": name, **{k: params[k] for k in ("preset", "config", "seq", "ckpt")}}
        row["estimate"] = est
        if "error" in result:
            return {**row, "ok": False, "error": result["error"], "detail": result.get("detail")}
        row.update(
            {k: result.get(k) for k in ("max_allocated", "max_reserved", "device_used", "tokens_per_s")}
        )
        row["finite"] = result["finite"]
        row["notes"] = result.get("notes")
        ok = result["finite"]
        if result.get("max_allocated"):
            ratio = est["without_overhead"] / result["max_allocated"]
            row["estimate_over_allocated"] = ratio
            row["estimate_over_reserved"] = est["without_overhead"] / result["max_reserved"]
            row["context_measured"] = result["device_used"] - result["max_reserved"]
            ok = ok and 1 - UNDER <= ratio <= 1 + OVER
        row["ok"] = ok
        return row

    # 4
    def big_step(self) -> None:
        t0 = time.perf_counter()
        preset = "test" if self.dry else "8b"
        budget = GIB if self.dry else gpu_total_bytes()
        longest = longest_fitting_seq(preset, budget, 64 if self.dry else 1024)
        run_at = min(longest, 1024 if self.dry else self.args.max_seq)
        seqs = {"seq 4096": 256 if self.dry else 4096, "longest": run_at}
        configs = {k: self._config(preset, "adalomo", s, True, 1, 0) for k, s in seqs.items()}
        results = self.workers(configs, timeout=240)
        rows = [self._compare(k, configs[k], results[k]) for k in configs]
        self.record(
            "big_step",
            all(r["ok"] for r in rows),
            time.perf_counter() - t0,
            preset=preset,
            budget=budget,
            estimator_longest=longest,
            max_seq=1024 if self.dry else self.args.max_seq,
            rows=rows,
        )

    # 5
    def memory(self) -> None:
        t0 = time.perf_counter()
        presets = ("test",) if self.dry else ("1b", "8b")
        seq = 256 if self.dry else 2048
        configs = {
            f"{preset} {opt}{' ckpt' if ckpt else ''}": self._config(preset, opt, seq, ckpt, 1, 1)
            for preset in presets
            for opt in OPTIMIZERS
            for ckpt in (False, True)
        }
        results = self.workers(configs, timeout=150)
        rows = [self._compare(k, configs[k], results[k]) for k in configs]
        self.record("memory", all(r["ok"] for r in rows), time.perf_counter() - t0, seq=seq, rows=rows)

    # 6
    def throughput(self) -> None:
        t0 = time.perf_counter()
        preset = "test" if self.dry else "1b"
        seq, steps = (256, 2) if self.dry else (2048, 6)
        names = list(THROUGHPUT)
        skipped = []
        if importlib.util.find_spec("lomo_optim") is None:
            if not self.dry:  # carried to the GPU machine as a wheel: its absence there is a failure
                self.record(
                    "throughput", False, 0.0, error="lomo-optim is not installed (pip install lomo-optim)"
                )
                return
            names.remove("lomo_optim_adalomo")
            skipped.append("lomo_optim_adalomo (lomo-optim not installed)")
        configs = {n: self._config(preset, n, seq, False, steps, 2) for n in names}
        results = self.workers(configs, timeout=150)
        rows = []
        for n in names:
            r = results[n]
            rows.append(
                {
                    "name": n,
                    "ok": "error" not in r and r["finite"],
                    **{k: r.get(k) for k in ("tokens_per_s", "max_allocated", "losses", "error", "notes")},
                }
            )
        base = next((r["tokens_per_s"] for r in rows if r["name"] == "adamw" and r.get("tokens_per_s")), None)
        for r in rows:
            r["vs_adamw"] = r["tokens_per_s"] / base if base and r.get("tokens_per_s") else None
        self.record(
            "throughput",
            all(r["ok"] for r in rows),
            time.perf_counter() - t0,
            preset=preset,
            seq=seq,
            steps=steps,
            rows=rows,
            skipped=skipped,
        )


def gpu_total_bytes() -> int:
    import torch

    return torch.cuda.mem_get_info()[1]


def gpu_info() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": props.total_memory / GIB,
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count(),
    }


def packages() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "peft", "lomo-optim", "pytorch_optimizer", "datasets", "torchao",
             "galore-torch", "apollo-torch", "adam-mini", "badam", "bitsandbytes")  # fmt: skip
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped of a pytest JUnit XML file (zeros if it is missing)."""
    if not path.is_file():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed_names = [
        f"{tc.get('classname')}::{tc.get('name')}"
        for tc in suite.iter("testcase")
        if tc.find("failure") is not None or tc.find("error") is not None
    ]
    return {
        "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
        "failed": n["failures"],
        "errors": n["errors"],
        "skipped": n["skipped"],
        "failed_tests": failed_names[:50],
    }


def run_summary(run_dir: Path) -> dict[str, Any]:
    """First and last training loss, and the final evaluation, of a leantune run directory."""
    from leantune.monitor import read_metrics

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    summary = next((r for r in reversed(records) if r.get("kind") == "summary"), {})
    return {
        "steps": train[-1]["step"] if train else 0,
        "first_loss": train[0]["loss"] if train else float("nan"),
        "last_loss": train[-1]["loss"] if train else float("nan"),
        "eval_loss": summary.get("eval_loss"),
        "acc": {k: v for k, v in summary.items() if k.startswith("acc")},
        "tokens_per_s": summary.get("tokens_per_s"),
        "peak_mem_bytes": summary.get("peak_mem_bytes"),
        "train_seconds": summary.get("train_seconds"),
    }


# ------------------------------------------------------------------------------------- the report
def _gib(x: float | None) -> str:
    return benchlib.fmt(None if x is None else x / GIB, ".2f")


def render(report: dict[str, Any]) -> str:
    gpu = report.get("gpu")
    where = (
        f"{gpu['name']} ({gpu['memory_gib']:.0f} GiB, CUDA {gpu['cuda']})"
        if gpu
        else "no GPU (dry run on CPU)"
    )
    m = report["machine"]
    lines = [
        "# GPU check" + (" (dry run)" if report["dry_run"] else ""),
        "",
        f"- Device: {where}; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}.",
        "- Packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in report["packages"].items()) + ".",
        benchlib.source_note(report.get("source")),
        f"- Wall time: {report.get('wall_s', 0):.0f} s. Command: `scripts/gpu-check"
        + (" --dry-run" if report["dry_run"] else "")
        + "`.",
        "",
        benchlib.render_table(
            ["section", "result", "seconds"],
            [
                [k, "ok" if v["ok"] else "**FAILED**", f"{v['seconds']:.0f}"]
                for k, v in report["sections"].items()
            ],
            "llr",
        ),
    ]
    s = report["sections"]
    if "tests" in s:
        t = s["tests"]
        if "collected" in t:
            lines.append(f"Tests: {t['collected']} CUDA variants collected (dry run: not run).\n")
        else:
            lines.append(
                f"Tests (`pytest -m cuda`): {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped.\n"
            )
            for name in t.get("failed_tests", []):
                lines.append(f"- failed: `{name}`")
            lines.append("")
    for key in ("default_job", "fsdp_offload"):
        if key in s and "first_loss" in s[key]:
            j = s[key]
            acc = j["acc"].get("acc")
            lines.append(
                f"{key}: `{j['command']}`: loss {j['first_loss']:.3f} → {j['last_loss']:.3f} in {j['steps']} "
                f"steps, eval loss {benchlib.fmt(j['eval_loss'], '.3f')}, accuracy "
                f"{benchlib.fmt(None if acc is None else 100 * acc, '.1f', '%')}, "
                f"{benchlib.fmt(j['tokens_per_s'], '.0f')} tokens/s, peak {_gib(j['peak_mem_bytes'])} GiB.\n"
            )
    for key in ("big_step", "memory"):
        if key not in s or "rows" not in s[key]:
            continue
        sec = s[key]
        if key == "big_step":
            lines.append(
                f"Big step ({sec['preset']}, AdaLomo, bf16, checkpointing): the estimator's longest "
                f"sequence within {_gib(sec['budget'])} GiB is {sec['estimator_longest']}; run at "
                f"min(that, --max-seq {sec['max_seq']}).\n"
            )
        else:
            lines.append(
                f"Peak memory against `leantune estimate --device cuda` (bf16, seq {sec['seq']}, batch 1):\n"
            )
        lines.append(memory_table(sec["rows"]))
    if "throughput" in s and "rows" in s["throughput"]:
        sec = s["throughput"]
        lines.append(f"Throughput ({sec['preset']}, bf16, seq {sec['seq']}, {sec['steps']} timed steps):\n")
        lines.append(
            benchlib.render_table(
                ["optimizer", "tokens/s", "vs AdamW", "peak allocated GiB"],
                [
                    [
                        r["name"],
                        benchlib.fmt(r.get("tokens_per_s"), ".0f"),
                        benchlib.fmt(r.get("vs_adamw"), ".2f"),
                        _gib(r.get("max_allocated")),
                    ]
                    for r in sec["rows"]
                ],
                "lrrr",
            )
        )
    failures = [f"- {k}: {v.get('error') or v.get('tail', '')[-600:]}" for k, v in s.items() if not v["ok"]]
    if failures:
        lines += ["## Failures", "", *failures, ""]
    return "\n".join(lines) + "\n"


def memory_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        est = r["estimate"]
        body.append(
            [
                r["name"],
                str(r["seq"]),
                _gib(r.get("max_allocated")),
                _gib(r.get("max_reserved")),
                _gib(est["without_overhead"]),
                benchlib.fmt(r.get("estimate_over_allocated"), ".2f"),
                _gib(r.get("context_measured")),
                "ok" if r["ok"] else f"**FAILED** {r.get('error', '')}",
            ]
        )
    return benchlib.render_table(
        [
            "configuration",
            "seq",
            "allocated GiB",
            "reserved GiB",
            "estimate GiB",
            "est./alloc.",
            "context GiB",
            "",
        ],
        body,
        "lrrrrrrl",
    )


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--out", default=str(HERE / "results"), help="report directory (default benchmarks/results)"
    )
    ap.add_argument("--dry-run", action="store_true", help="run on the CPU at toy sizes (no GPU needed)")
    ap.add_argument("--only", help=f"comma-separated sections (default all: {', '.join(SECTIONS)})")
    ap.add_argument(
        "--max-seq", type=int, default=32768, help="cap of the longest-sequence step (default 32768)"
    )
    ap.add_argument("--workers", type=int, default=8, help="pytest workers on the GPU (default 8)")
    ap.add_argument("--tests-timeout", type=float, default=300.0, help="seconds for the tests (default 300)")
    ap.add_argument(
        "--work", help="directory for the jobs' runs and the test log (default: a new temporary one)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        params = json.loads(args.worker)
        try:
            benchlib.emit_result(step_worker(params))
        except Exception as err:  # the parent records it and goes on
            import traceback

            traceback.print_exc()
            print(f"{type(err).__name__}: {err}", file=sys.stderr)
            return 1
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here; use --dry-run to run the same code on the CPU", file=sys.stderr
        )
        return 2
    sections = benchlib.parse_only(args.only, list(SECTIONS))
    check = Check(args)
    for name in sections:
        t0 = time.perf_counter()
        check.log(f"{name} ...")
        try:
            getattr(check, name)()
        except Exception as err:  # a section that crashes is a failed check; the others still run
            import traceback

            check.record(
                name,
                False,
                time.perf_counter() - t0,
                error=f"{type(err).__name__}: {err}",
                tail=traceback.format_exc()[-3000:],
            )
    check.write()
    failed = [k for k, v in check.report["sections"].items() if not v["ok"]]
    check.log(
        f"report: {check.out / 'gpu_check.md'}; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
