"""The chunked linear cross-entropy against the standard loss: peak memory, step time, the estimate.

    python benchmarks/chunked_loss.py [--seqs 2048,4096] [--chunk 256] [--steps 2]

One AdaLomo step (bf16, activation checkpointing, batch 1) on the Llama-3.2-1B shape (preset
``1b-l3``: vocabulary 128,256, tied head), each configuration in a fresh subprocess with the worker
of ``benchmarks/estimate_validation.py`` (peak RSS from after the model is built, glibc's mmap
threshold fixed): the standard loss (``train.loss_chunk=0``, full fp32 logits), the chunked loss,
and the *floor* with the chunked loss (forward + backward, each gradient dropped as it arrives: what
is left is weights, checkpointed layer inputs, one layer's recomputation and one loss chunk). At the
first length the chunked AdaLomo step is measured twice more: with the threshold fixed by
``mallopt`` at start-up as ``leantune train`` does (no environment variable), and with glibc's
defaults (what a plain script sees). Step time is that of the last step (the first allocates the
optimizer state); standard and chunked alternate.

Results: ``benchmarks/results/chunked_loss.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import benchlib
import estimate_validation as ev

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1 << 30


def matrix(seqs: list[int], chunk: int) -> list[tuple[str, ev.Config, dict[str, bool]]]:
    """(label, configuration, allocator mode) in the order they run."""
    runs = []
    for i, seq in enumerate(seqs):
        base = {"preset": "1b-l3", "dtype": "bf16", "seq": seq, "ckpt": True}
        pair = [("standard", ev.Config(optim="adalomo", **base)),
                ("chunked", ev.Config(optim="adalomo", loss_chunk=chunk, **base))]  # fmt: skip
        for label, cfg in pair if i % 2 == 0 else pair[::-1]:
            runs.append((label, cfg, {}))
        runs.append(("floor (chunked)", ev.Config(optim="floor", loss_chunk=chunk, **base), {}))
        if i == 0:
            chunked = pair[1][1]
            runs.append(("chunked, mallopt at start-up", chunked, {"mallopt": True}))
            runs.append(("chunked, glibc defaults", chunked, {"default_malloc": True}))
    return runs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--chunk", type=int, default=256, help="train.loss_chunk of the chunked runs")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "chunked_loss")
    args = parser.parse_args(argv)
    seqs = [int(x) for x in args.seqs.split(",")]
    load = benchlib.loadavg()
    rows = []
    for label, cfg, mode in matrix(seqs, args.chunk):
        t0 = time.time()
        meas = ev._run_subprocess(cfg, threads=args.threads, steps=args.steps,
                                  default_malloc=mode.get("default_malloc", False),
                                  mallopt=mode.get("mallopt", False))  # fmt: skip
        pred = ev.predict(cfg)
        row = {"label": label, "seq": cfg.seq, "config": cfg.name, "mode": mode,
               "measured": meas["peak_rss"], "predicted": pred["total"], "moment": pred["moment"],
               "step_seconds": meas["seconds"][-1], "losses": meas["losses"],
               "prediction": pred, "measurement": meas}  # fmt: skip
        rows.append(row)
        print(f"{label} seq {cfg.seq}: {row['measured'] / GiB:.2f} GiB measured, "
              f"{row['predicted'] / GiB:.2f} predicted, step {row['step_seconds']:.1f} s "
              f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": benchlib.machine(),
              "source": benchlib.source(), "load": load, "rows": rows}  # fmt: skip
    benchlib.write_report(args.out, report, render(report))
    print(f"wrote {args.out}.md")
    return 0


def render(report: dict) -> str:
    rows = report["rows"]
    lines = [
        "# Chunked linear cross-entropy vs the standard loss (Llama-3.2-1B shape)",
        "",
        f"Command: `python benchmarks/chunked_loss.py --seqs {report['args']['seqs']} "
        f"--chunk {report['args']['chunk']} --steps {report['args']['steps']}`  ",
        f"One AdaLomo step, bf16, activation checkpointing, batch 1, vocabulary 128,256 (tied); "
        f"{report['machine']['cpus']} CPUs, load before: {benchlib.format_load(report['load'])}.",
        benchlib.source_note(report["source"]),
        "",
        "| run | seq | peak RSS (GiB) | estimate (GiB) | error | estimated peak at | step (s) | "
        "time / standard | peak / floor |",
        "|---|--:|--:|--:|--:|---|--:|--:|--:|",
    ]
    for r in rows:
        same = [x for x in rows if x["seq"] == r["seq"]]
        std = next((x for x in same if x["label"] == "standard"), None)
        floor = next((x for x in same if x["label"].startswith("floor")), None)
        ratio = f"{r['step_seconds'] / std['step_seconds']:.3f}" if std else ""
        to_floor = f"{r['measured'] / floor['measured']:.3f}" if floor else ""
        err = (r["predicted"] - r["measured"]) / r["measured"]
        cells = [r["label"], r["seq"], f"{r['measured'] / GiB:.2f}", f"{r['predicted'] / GiB:.2f}",
                 f"{err:+.1%}", r["moment"], f"{r['step_seconds']:.1f}", ratio, to_floor]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "The estimate assumes glibc's mmap threshold fixed (what `leantune train` sets at start-up); the "
        "'glibc defaults' row is a plain script without it. Losses of the standard and chunked steps: "
        + "; ".join(f"{r['label']} s{r['seq']} {', '.join(f'{x:.4f}' for x in r['losses'])}"
                    for r in rows if r["label"] in ("standard", "chunked")),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
