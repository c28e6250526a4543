"""Streaming keeps memory flat: peak RSS of a training run from a large JSON-lines file against the
same run from a small one.

    python benchmarks/streaming.py [--big-gib 2] [--small-mib 20] [--steps 50]

Writes two files of the same instruction records (``reverse``/``sort`` prompts, ~120 bytes a line)
into a scratch directory, then runs ``leantune train data.streaming=true`` on each for ``--steps``
steps (the default job's model and batch size, no evaluation), each in a fresh process, and reads
the run's peak RSS from its summary. The files are deleted afterwards.

Results: ``benchmarks/results/streaming.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

RESULTS = Path(__file__).resolve().parent / "results"


def write_records(path: Path, size: int) -> int:
    """Instruction records until the file holds ``size`` bytes; returns the record count."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    n = 0
    block: list[str] = []
    written = 0
    with path.open("w") as fh:
        while written < size:
            word = "".join(rng.choice(letters) for _ in range(rng.randint(4, 12)))
            line = json.dumps({"prompt": f"reverse {word}\n", "response": word[::-1], "id": n}) + "\n"
            block.append(line)
            written += len(line)
            n += 1
            if len(block) >= 10000:
                fh.write("".join(block))
                block = []
        fh.write("".join(block))
    return n


def train(path: Path, steps: int, out: Path) -> dict:
    from leantune.monitor import read_metrics

    cmd = [sys.executable, "-m", "leantune", "train", f"data.train={path}", "data.streaming=true",
           f"train.max_steps={steps}", "eval.every=0", "data.num_eval=0", "log.progress=false",
           "log.plot=false", "log.tensorboard=false", "train.save_every=0", f"train.output_dir={out}",
           "train.run_name=r"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training on {path} failed:\n{proc.stderr[-3000:]}")
    summary = next(r for r in read_metrics(out / "r") if r["kind"] == "summary")
    return {"peak_rss_mib": summary["peak_mem_bytes"] / 2**20, "wall_s": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-gib", type=float, default=2.0)
    parser.add_argument("--small-mib", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report: dict = {"args": settings, "machine": benchlib.machine(), "source": benchlib.source(), "runs": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("LEANTUNE_BENCH_TMP")) as tmp:
        for name, size in (("small", int(args.small_mib * 2**20)), ("big", int(args.big_gib * 2**30))):
            path = Path(tmp) / f"{name}.jsonl"
            t0 = time.perf_counter()
            records = write_records(path, size)
            print(f"{name}: wrote {path.stat().st_size / 2**20:.0f} MiB ({records} records) "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
            run = train(path, args.steps, Path(tmp) / f"runs-{name}")
            run |= {"file_mib": path.stat().st_size / 2**20, "records": records}
            report["runs"][name] = run
            print(f"{name}: peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)
            path.unlink()
    small, big = report["runs"]["small"], report["runs"]["big"]
    report["ratio"] = big["peak_rss_mib"] / small["peak_rss_mib"]
    lines = [
        "# Streaming: peak memory from a large file vs a small one",
        "",
        f"Command: `python benchmarks/streaming.py --big-gib {args.big_gib} --small-mib {args.small_mib} "
        f"--steps {args.steps}`  ",
        f"{benchlib.machine()['cpus']} CPUs.",
        benchlib.source_note(report["source"]),
        "",
        "| file | size (MiB) | records | peak RSS (MiB) | wall (s) |",
        "|---|--:|--:|--:|--:|",
        *(
            f"| {n} | {r['file_mib']:.0f} | {r['records']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} |"
            for n, r in report["runs"].items()
        ),  # fmt: skip
        "",
        f"Peak RSS big / small: **{report['ratio']:.3f}** (goal: within 10%).",
    ]
    benchlib.write_report(args.out, report, "\n".join(lines) + "\n")
    print(f"big/small peak RSS {report['ratio']:.3f}; wrote {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
