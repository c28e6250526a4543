"""Throughput of ``leantune train`` against a plain PyTorch loop doing the same work.

    python benchmarks/trainer_overhead.py [--steps 300] [--repeats 3]

Both run the default job's model (preset ``tiny``), data (built-in tasks, same order), batch size
and optimizer (AdaLomo) for ``--steps`` steps, without evaluation or intermediate checkpoints, each
in a fresh subprocess; repeats alternate between the two. The plain loop is the minimum a user would
write for the same work: ``opt.backward(loss_fn(model, batch))`` over the same batches with the
loss and the allocator setting ``leantune train`` uses (``leantune.loss.ChunkedLMLoss``,
``leantune.rss.fix_mmap_threshold()``; their own costs are in ``chunked_loss.md`` and
``allocator.md``), no logging. tokens/s count the
non-padding tokens of the batches. The ratio is the library's own overhead (config, monitoring,
per-step metric syncs, progress bar, LR scheduler).

Results: ``benchmarks/results/trainer_overhead.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import benchlib

RESULTS = Path(__file__).resolve().parent / "results"


def plain_loop(steps: int) -> dict:
    from leantune.config import Config
    from leantune.data import BatchStream, build_byte_tokenizer, build_datasets
    from leantune.loss import ChunkedLMLoss
    from leantune.models import build_model
    from leantune.optim import AdaLomo
    from leantune.rss import fix_mmap_threshold

    fix_mmap_threshold()
    cfg = Config()
    tok = build_byte_tokenizer()
    data = build_datasets(cfg.data, tok)
    model = build_model(preset=cfg.model.preset, vocab_size=len(tok), seed=cfg.train.seed)
    model.config.use_cache = False
    opt = AdaLomo(model, lr=cfg.optim.lr)
    loss_fn = ChunkedLMLoss(model, cfg.train.loss_chunk)
    stream = BatchStream(data.train, cfg.train.batch_size, tok.pad_token_id, seed=cfg.train.seed)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = stream.next_batch()
        tokens += int(batch["attention_mask"].sum())
        opt.backward(loss_fn(model, batch))
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds}


def worker(kind: str, steps: int) -> None:
    if kind == "plain":
        benchlib.emit_result(plain_loop(steps))


def run(kind: str, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if kind == "plain":
        cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(steps)]
        res = benchlib.run_worker(cmd, env, kind)
        return res["tokens"] / res["seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "leantune",
            "train",
            f"train.max_steps={steps}",
            "eval.every=0",
            "eval.accuracy_samples=0",
            "eval.max_batches=1",
            "log.plot=false",
            "log.progress=false",
            f"train.output_dir={tmp}",
            "train.run_name=r",
        ]
        subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        from leantune.monitor import read_metrics

        records = read_metrics(Path(tmp) / "r")
    return next(r for r in records if r["kind"] == "summary")["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "trainer_overhead"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    command = "python benchmarks/trainer_overhead.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {"plain": [], "leantune": []}
    for _ in range(args.repeats):
        for kind in ("plain", "leantune"):
            rates[kind].append(run(kind, args.steps))
            print(kind, f"{rates[kind][-1]:.0f} tokens/s", flush=True)
    plain, lt = statistics.median(rates["plain"]), statistics.median(rates["leantune"])
    from leantune.config import Config

    default = Config()
    text = (
        "# Trainer overhead: `leantune train` vs a plain PyTorch loop\n\n"
        f"`{command}` — {datetime.now(timezone.utc).date()}, default job (preset tiny, built-in tasks, "
        f"AdaLomo, batch {default.train.batch_size}), {args.steps} steps, medians of {args.repeats} "
        "alternating runs, each a fresh "
        f"process; load average before {load_before[0]:.1f}.\n\n"
        "| loop | tokens/s (median) | runs |\n|---|--:|---|\n"
        f"| plain PyTorch loop | {plain:.0f} | {', '.join(f'{x:.0f}' for x in rates['plain'])} |\n"
        f"| `leantune train` | {lt:.0f} | {', '.join(f'{x:.0f}' for x in rates['leantune'])} |\n\n"
        f"**leantune / plain = {lt / plain:.3f}** (overhead {100 * (1 - lt / plain):.1f}%).\n"
    )
    print(text)
    out = Path(args.out)
    report = {"command": command, "steps": args.steps, "rates": rates, "ratio": lt / plain}
    benchlib.write_report(out, report, text, indent=1)
    plot(rates, out.with_suffix(".png"))


def plot(rates: dict[str, list[float]], path: Path) -> None:
    """Bar chart of the median tokens/s of both loops, each run as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(rates)
    ax.bar(names, [statistics.median(rates[n]) for n in names], color=["#888888", "#1f77b4"])
    for i, n in enumerate(names):
        ax.plot([i] * len(rates[n]), rates[n], "k.", ms=6)
    ax.set_ylabel("tokens/s (median, dots: runs)")
    ax.set_title("leantune train vs a plain loop, default job")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
