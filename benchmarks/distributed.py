"""1 vs 2 ranks (CPU, gloo) under ``ddp`` and ``fsdp``: per-rank peak memory and tokens/s.

    python benchmarks/distributed.py [--preset 0.1b] [--seq 256] [--batch 2] [--steps 4]

Every configuration runs in fresh processes (``torchrun --standalone --nproc-per-node N`` for
two ranks), in the same invocation. Each rank builds the model (random init, same seed), applies the
strategy exactly as ``leantune train dist.strategy=...`` does (``leantune.distributed.strategy``),
trains ``--steps`` steps on its own random batch of ``--batch`` sequences (weak scaling: the global
batch grows with the ranks) and reports its peak RSS over the training steps (construction, which
builds the full model on every rank before sharding, is excluded) and its step times.

Results: ``benchmarks/results/distributed.{md,json,png}``. On two CPU cores, two ranks share the
cores of one, so tokens/s show the overhead of the collectives rather than a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from leantune.rss import proc_status_bytes, release_free_memory, reset_peak_rss

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [
    ("none", 1, "adalomo"),
    ("ddp", 2, "adalomo"),
    ("fsdp", 2, "adalomo"),
    ("none", 1, "adamw"),
    ("ddp", 2, "adamw"),
    ("fsdp", 2, "adamw"),
]
# glibc keeps freed large blocks in its heap after adapting its mmap threshold; fixing the
# threshold makes RSS follow the live tensors instead of the allocator's history.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from leantune.distributed.strategy import attach_optimizer, wrap_model
    from leantune.models import build_model
    from leantune.optim import Stepper, build_optimizer, is_fused

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model = build_model(preset=args.preset, seed=0)
    model.config.use_cache = False
    fused = is_fused(args.optim)

    class DistCfg:
        mixed_precision = None
        cpu_offload = False

    train_model = wrap_model(model, args.strategy, fused=fused, device=torch.device("cpu"), dist_cfg=DistCfg)
    lr = 1e-3 if args.optim == "adalomo" else 1e-4
    opt = build_optimizer(args.optim, model, lr=lr)
    attach_optimizer(opt, args.strategy)
    stepper = opt if fused else Stepper(opt)
    local = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters()
    )
    vocab = model.config.vocab_size
    release_free_memory()
    if not reset_peak_rss():  # peak over the training steps only
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    times = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        t0 = time.perf_counter()
        stepper.backward(train_model(input_ids=ids, labels=ids).loss)
        times.append(time.perf_counter() - t0)
    record = {
        "rank": rank,
        "local_param_bytes": local,
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
        "step_seconds": times,
    }
    records = [None] * world
    if world > 1:
        dist.all_gather_object(records, record)
        dist.barrier()
        dist.destroy_process_group()
    else:
        records = [record]
    if rank == 0:
        Path(args.out).write_text(json.dumps(records))
    if world > 1:
        from leantune.distributed.runtime import exit_worker

        exit_worker(0)  # skips interpreter teardown, where gloo can abort a finished worker


def run_config(strategy: str, nproc: int, optim: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{strategy}-{nproc}-{optim}.json"
    worker_args = [
        "--worker",
        "--strategy",
        strategy,
        "--optim",
        optim,
        "--preset",
        args.preset,
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--out",
        str(out),
    ]
    if nproc == 1:
        cmd = [sys.executable, __file__, *worker_args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            __file__,
            *worker_args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **MALLOC_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        return {"strategy": strategy, "ranks": nproc, "optim": optim, "error": proc.stderr[-1500:]}
    ranks = json.loads(out.read_text())
    warm = max(1, args.steps // 4)  # the first steps include one-time allocation
    step_s = max(sum(r["step_seconds"][warm:]) / len(r["step_seconds"][warm:]) for r in ranks)
    return {
        "strategy": strategy,
        "ranks": nproc,
        "optim": optim,
        "peak_rss_gib_per_rank": max(r["peak_rss_bytes"] for r in ranks) / 2**30,
        "param_gib_per_rank": max(r["local_param_bytes"] for r in ranks) / 2**30,
        "seconds_per_step": step_s,
        "tokens_per_s": nproc * args.batch * args.seq / step_s,
        "tokens_per_s_per_rank": args.batch * args.seq / step_s,
    }


def report(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Data parallel and FSDP2 on CPU (gloo): per-rank memory and throughput",
        "",
        f"`{command}` — {datetime.now(timezone.utc).date()}, torch {args.torch_version}, "
        f"preset {args.preset}, seq {args.seq}, {args.batch} sequences per rank, fp32, 1 thread per rank "
        f"(2 cores), load average {args.load}.",
        "",
        "| optimizer | strategy | ranks | weights / rank (GiB) | peak RSS / rank (GiB) | x 1 rank | s/step | "
        "tokens/s (all ranks) | tokens/s per rank |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base = {r["optim"]: r for r in rows if r["ranks"] == 1 and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['optim']} | {r['strategy']} | {r['ranks']} | failed: {r['error'][-200:]!r} |")
            continue
        ratio = (
            r["peak_rss_gib_per_rank"] / base[r["optim"]]["peak_rss_gib_per_rank"]
            if r["optim"] in base
            else 0
        )
        lines.append(
            f"| {r['optim']} | {r['strategy']} | {r['ranks']} | {r['param_gib_per_rank']:.3f} | "
            f"{r['peak_rss_gib_per_rank']:.3f} | {ratio:.2f} | {r['seconds_per_step']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_per_rank']:.0f} |"
        )
    lines += [
        "",
        "Peak RSS is measured over the training steps of each rank (process baseline of ~0.35 GiB for "
        "python + torch + transformers included). Under `fsdp` each rank holds half of the weights and "
        "of the optimizer state, plus one all-gathered unit (a decoder layer, or the embedding / head) "
        "and its unsharded gradient at a time. Under `ddp` every rank holds everything; the fused "
        "optimizers average each gradient inside their backward hooks. Two ranks on two cores "
        "time-share the CPU, so tokens/s here measure the cost of the collectives, not scaling.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    labels = [f"{r['optim']}\n{r['strategy']} x{r['ranks']}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(labels, [r["peak_rss_gib_per_rank"] for r in ok], color="tab:blue")
    axes[0].bar(labels, [r["param_gib_per_rank"] for r in ok], color="tab:orange", label="weights")
    axes[0].set_ylabel("peak RSS per rank (GiB)")
    axes[0].legend()
    axes[1].bar(labels, [r["tokens_per_s"] for r in ok], color="tab:green")
    axes[1].set_ylabel("tokens/s (all ranks)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="0.1b")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", default=str(RESULTS / "distributed"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--optim", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    args.torch_version = torch.__version__
    args.load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python benchmarks/distributed.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    tmp = out.parent / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for strategy, nproc, optim in CONFIGS:
        row = run_config(strategy, nproc, optim, args, tmp)
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = report(rows, args, command)
    print(text)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps(
            {"command": command, "machine": platform.processor() or platform.machine(), "rows": rows},
            indent=1,
        )
    )
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
