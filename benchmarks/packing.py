"""Padding-free packing against padded batches: non-padding tokens per second and peak memory.

    python benchmarks/packing.py [--samples 256] [--repeats 2]

Instruction-like samples with a realistic length spread (log-normal, clipped to 20-1000 tokens,
the first ~30% of each masked like a prompt) train for one pass with AdaLomo on a small LLaMA
(4 layers, hidden 256, vocab 512, fp32, SDPA), once padded (batches of ``--batch`` samples
padded to the batch's longest: what ``data.pack=false`` does) and once packed (``data.pack=true``:
rows of ``--max-length`` tokens, as many rows per batch as make the same number of samples per
step on average). Each run is a fresh subprocess; peak RSS is measured from after the model is
built. Both see the same samples in the same seeded order.

Results: ``benchmarks/results/packing.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import benchlib

RESULTS = Path(__file__).resolve().parent / "results"


def samples(n: int, seed: int):
    import random

    from leantune.data import IGNORE_INDEX, Sample

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(1000, max(20, round(rng.lognormvariate(5.0, 0.9))))  # median ~150 tokens
        ids = [rng.randrange(8, 512) for _ in range(length)]
        prompt = max(1, int(0.3 * length))
        out.append(Sample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def worker(mode: str, n: int, batch: int, max_length: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantune.data import collate, pack_samples
    from leantune.optim import AdaLomo
    from leantune.rss import proc_status_kib, reset_peak_rss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max_length,
                      attn_implementation="sdpa", use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = AdaLomo(model, lr=1e-3)
    data = samples(n, seed=1)
    if mode == "packed":
        rows, stats = pack_samples(data, max_length, seed=0)
        per_step = max(1, round(batch * len(rows) / len(data)))
        batches = [rows[i : i + per_step] for i in range(0, len(rows), per_step)]
    else:
        batches = [data[i : i + batch] for i in range(0, len(data), batch)]
    real = positions = 0
    reset_peak_rss()
    base = proc_status_kib("VmRSS") or 0
    t0 = time.perf_counter()
    for group in batches:
        b = collate(group, pad_id=0)
        real += int(b["attention_mask"].sum())
        positions += b["input_ids"].numel()
        if "position_ids" in b:
            del b["attention_mask"]
        opt.backward(model(**b).loss)
    seconds = time.perf_counter() - t0
    peak = (proc_status_kib("VmHWM") or 0) - base
    benchlib.emit_result({"mode": mode, "seconds": seconds, "real_tokens": real, "positions": positions,
                          "steps": len(batches), "peak_rss_mib": peak / 1024})  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "packing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.samples, args.batch, args.max_length)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    runs: dict[str, list[dict]] = {"padded": [], "packed": []}
    for r in range(args.repeats):
        for mode in ("padded", "packed") if r % 2 == 0 else ("packed", "padded"):
            cmd = [sys.executable, __file__, "--worker", mode, "--samples", str(args.samples),
                   "--batch", str(args.batch), "--max-length", str(args.max_length)]  # fmt: skip
            res = benchlib.run_worker(cmd, env, mode, timeout=3600)
            runs[mode].append(res)
            print(f"{mode}: {res['real_tokens'] / res['seconds']:.0f} tokens/s, "
                  f"{res['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {
            "tokens_per_s": statistics.median(x["real_tokens"] / x["seconds"] for x in rs),
            "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in rs),
            "padding_share": 1 - rs[0]["real_tokens"] / rs[0]["positions"],
            "steps": rs[0]["steps"],
        }
    speedup = summary["packed"]["tokens_per_s"] / summary["padded"]["tokens_per_s"]
    report = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
              "machine": benchlib.machine(), "source": benchlib.source(), "load": benchlib.loadavg(),
              "runs": runs, "summary": summary, "speedup": speedup}  # fmt: skip
    lines = [
        "# Padding-free packing vs padded batches",
        "",
        f"Command: `python benchmarks/packing.py --samples {args.samples} --repeats {args.repeats}`  ",
        f"{benchlib.machine()['cpus']} CPUs; load before: {benchlib.format_load(report['load'])}.",
        benchlib.source_note(report["source"]),
        "",
        "| batches | non-padding tokens/s | padding share | optimizer steps | peak RSS (MiB) |",
        "|---|--:|--:|--:|--:|",
    ]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['tokens_per_s']:.0f} | {s['padding_share']:.1%} | {s['steps']} | "
                     f"{s['peak_rss_mib']:.0f} |")  # fmt: skip
    lines += ["", f"Packed / padded throughput: **{speedup:.2f}x** (median of {args.repeats})."]
    benchlib.write_report(args.out, report, "\n".join(lines) + "\n")
    print(f"packed/padded {speedup:.2f}x; wrote {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
