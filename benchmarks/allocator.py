"""glibc's mmap threshold: peak RSS against step time, for the choice `leantune train` makes.

    python benchmarks/allocator.py [--thresholds default,65536,1048576,8388608] [--steps 3]

One configuration (the Llama-3.2-1B shape, bf16, activation checkpointing, AdaLomo, the chunked
loss, seq 2048, batch 1: the chunked row of ``benchmarks/chunked_loss.py``) run in a fresh process
per threshold with the worker of ``benchmarks/estimate_validation.py``; ``default`` is glibc's
adaptive threshold, a number is ``MALLOC_MMAP_THRESHOLD_`` in bytes (fixed: no adaptation). The
estimate is the same for all (it assumes a fixed threshold). Step time: the median of the steps
after the first. Then the built-in default job (``leantune train``, ``--job-steps`` steps, no
evaluation) under each threshold: its tokens/s and peak RSS as its run summary reports them.
Thresholds alternate order between repeats.

Results: ``benchmarks/results/allocator.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import benchlib
import estimate_validation as ev

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1 << 30
CONFIG = ev.Config(preset="1b-l3", optim="adalomo", dtype="bf16", seq=2048, ckpt=True, loss_chunk=256)


def measure(threshold: str, steps: int, threads: int) -> dict:
    payload = {**asdict(CONFIG), "threads": threads, "steps": steps}
    mmap = None if threshold == "default" else threshold
    return ev.measure_in_subprocess(payload, threshold, threads=threads, mmap_threshold=mmap)


def default_job(threshold: str, steps: int, out: Path) -> dict:
    """tokens/s and peak RSS of the default job under ``threshold`` (its metrics.jsonl)."""
    from leantune.monitor import read_metrics

    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    fix = "false"
    if threshold != "default":
        env["MALLOC_MMAP_THRESHOLD_"] = threshold  # leantune train leaves a threshold you set alone
        fix = "true"
    name = f"alloc-{threshold}"
    cmd = [sys.executable, "-m", "leantune", "train", f"train.max_steps={steps}", "eval.every=0",
           "eval.accuracy_samples=0", "log.progress=false", "log.plot=false", "log.tensorboard=false",
           f"train.fix_mmap_threshold={fix}", f"train.output_dir={out}",
           f"train.run_name={name}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise benchlib.WorkerError(name, benchlib.exit_reason(proc.returncode), proc.stderr, proc.returncode)
    train = [r for r in read_metrics(out / name) if r["kind"] == "train"]
    tokens = sum(r["tokens"] for r in train) if "tokens" in train[0] else None
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:] or train),
            "peak_rss": max(r["peak_mem_bytes"] for r in train), "tokens": tokens}  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", default="default,65536,1048576,8388608")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--job-steps", type=int, default=300, help="default-job steps (0 = skip it)")
    parser.add_argument("--out", type=Path, default=RESULTS / "allocator")
    args = parser.parse_args(argv)
    names = args.thresholds.split(",")
    load = benchlib.loadavg()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            m = measure(name, args.steps, args.threads)
            runs[name].append(m)
            print(f"{name}: peak {m['peak_rss'] / GiB:.2f} GiB, steps {[round(s, 1) for s in m['seconds']]}",
                  flush=True)  # fmt: skip
    jobs: dict[str, list[dict]] = {n: [] for n in names}
    if args.job_steps:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for name in names if r % 2 == 0 else names[::-1]:
                    j = default_job(name, args.job_steps, Path(tmp))
                    jobs[name].append(j)
                    print(f"default job, {name}: {j['tokens_per_s']:.0f} tokens/s, "
                          f"{j['peak_rss'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
    predicted = ev.predict(CONFIG)["total"]
    rows = [{"threshold": n, "peak_rss": statistics.median(m["peak_rss"] for m in ms),
             "step_seconds": statistics.median(s for m in ms for s in m["seconds"][1:] or m["seconds"]),
             "job_tokens_per_s": statistics.median(j["tokens_per_s"] for j in jobs[n]) if jobs[n] else None,
             "job_peak_rss": statistics.median(j["peak_rss"] for j in jobs[n]) if jobs[n] else None}
            for n, ms in runs.items()]  # fmt: skip
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "config": asdict(CONFIG),
              "machine": benchlib.machine(), "source": benchlib.source(), "load": load,
              "predicted": predicted, "rows": rows, "runs": runs}  # fmt: skip
    benchlib.write_report(args.out, report, render(report))
    print(f"wrote {args.out}.md")
    return 0


def render(report: dict) -> str:
    rows, pred = report["rows"], report["predicted"]
    base = next((r for r in rows if r["threshold"] == "default"), rows[0])
    lines = [
        "# glibc's mmap threshold: peak RSS and step time",
        "",
        f"Command: `python benchmarks/allocator.py --thresholds {report['args']['thresholds']} "
        f"--steps {report['args']['steps']} --repeats {report['args']['repeats']}`  ",
        "Llama-3.2-1B shape, bf16, activation checkpointing, AdaLomo, chunked loss (256), seq 2048, "
        f"batch 1; {report['machine']['cpus']} CPUs, load before: {benchlib.format_load(report['load'])}.",
        benchlib.source_note(report["source"]),
        "",
        f"Estimate (assumes a fixed threshold): {pred / GiB:.2f} GiB.",
        "",
        "| MALLOC_MMAP_THRESHOLD_ | 1B: peak RSS (GiB) | vs estimate | step (s) | time / glibc default "
        "| default job: tokens/s | / glibc default | peak RSS (MiB) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        t = r["threshold"]
        name = "glibc default (adaptive)" if t == "default" else f"{int(t):,} B fixed"
        ratio = r["step_seconds"] / base["step_seconds"]
        job = ["", "", ""]
        if r.get("job_tokens_per_s"):
            job = [f"{r['job_tokens_per_s']:.0f}", f"{r['job_tokens_per_s'] / base['job_tokens_per_s']:.2f}",
                   f"{r['job_peak_rss'] / 2**20:.0f}"]  # fmt: skip
        lines.append(f"| {name} | {r['peak_rss'] / GiB:.2f} | {r['peak_rss'] / pred - 1:+.1%} | "
                     f"{r['step_seconds']:.1f} | {ratio:.2f} | " + " | ".join(job) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
