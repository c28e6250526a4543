"""Peak memory and time per step of AdaLomo against the optimizers a user would pick instead.

On a LLaMA-shaped model (``leantune.models`` preset, random init, seed 0) and one fixed random
batch, every configuration runs in a fresh subprocess (:func:`benchlib.run_matrix`) and reports its
peak RSS over the steps, the median seconds per step (forward + backward + update) over ``--steps``
timed steps after ``--warmup`` untimed ones, and the final loss; the parent adds the ratios to the
floor (forward + backward, every gradient dropped as soon as it is accumulated, no update) and to
AdamW, and writes ``<out>.md`` and ``<out>.json``. The configurations are the data in
:data:`CONFIGS`; the competitors are built by leantune's factory through their own packages
(:mod:`leantune.optim.competitors`).

The workers run with ``MALLOC_MMAP_THRESHOLD_=1048576``: ``leantune train`` fixes glibc's mmap
threshold at 1 MiB at start-up, so the peaks here are measured under the same allocator setting.

Run (from the repository root)::

    python benchmarks/competitors.py                                  # 0.37b, fp32, seq 512
    python benchmarks/competitors.py --preset tiny --steps 2 --warmup 1 --out /tmp/comp_tiny.md
    python benchmarks/competitors.py --dtype bf16 --only floor,adalomo,adamw,galore --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib.metadata
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import fmt, ratio

GIB = 1024**3
DTYPES = ("fp32", "bf16")
RESULTS = Path(__file__).resolve().parent / "results"

# Learning rates only keep the losses finite over a few steps; they do not change the cost of a step.
# GaLore and APOLLO at rank 256 (both papers' rank for the 350M LLaMA), the rest at their defaults.
CONFIGS: dict[str, dict[str, Any]] = {
    "floor": {"optim": None, "lr": None, "kwargs": {}},
    "adalomo": {"optim": "adalomo", "lr": 1e-3, "kwargs": {}},
    "lomo": {"optim": "lomo", "lr": 1e-3, "kwargs": {}},
    "adamw": {"optim": "adamw", "lr": 1e-4, "kwargs": {}},
    "galore": {"optim": "galore", "lr": 1e-4, "kwargs": {"rank": 256}},
    "adam_mini": {"optim": "adam_mini", "lr": 1e-4, "kwargs": {}},
    "apollo": {"optim": "apollo", "lr": 1e-4, "kwargs": {"rank": 256}},
    "badam": {"optim": "badam", "lr": 1e-4, "kwargs": {}},
    "adamw8bit": {"optim": "adamw8bit", "lr": 1e-4, "kwargs": {}},
    "adamw4bit": {"optim": "adamw4bit", "lr": 1e-4, "kwargs": {}},
}


# --------------------------------------------------------------------------------------- worker
def _drop_grad(p) -> None:
    p.grad = None


def run_worker(params: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: ``params`` is a :data:`CONFIGS` entry plus ``preset``,
    ``vocab_size``, ``dtype``, ``seq``, ``batch``, ``steps``, ``warmup`` and ``threads``."""
    import os
    import resource

    import torch

    from leantune.models import build_model, count_parameters, resolve_dtype
    from leantune.optim import build_optimizer, is_fused
    from leantune.rss import proc_status_kib, release_free_memory, reset_peak_rss

    torch.set_num_threads(int(params["threads"]))
    model = build_model(
        preset=params["preset"], vocab_size=params["vocab_size"], dtype=resolve_dtype(params["dtype"]), seed=0
    )
    model.config.use_cache = False
    model.train()
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.config.vocab_size, (params["batch"], params["seq"]), generator=gen)
    name = params["optim"]
    if name is None:  # the floor: weights + activations, what no optimizer can beat
        opt = None
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(_drop_grad)
    else:
        opt = build_optimizer(name, model, lr=params["lr"], **params["kwargs"])
    fused = name is not None and is_fused(name)

    release_free_memory()
    rss_ready_kib = proc_status_kib("VmRSS")
    peak_reset = reset_peak_rss()  # the peak below then excludes imports and model construction
    times, losses = [], []
    for _ in range(params["warmup"] + params["steps"]):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        if opt is None:
            loss.backward()
        elif fused:  # updates each parameter inside backward
            opt.backward(loss)
            opt.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        del loss
    hwm_kib = proc_status_kib("VmHWM") if peak_reset else None
    peak_kib = hwm_kib if hwm_kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "optimizer_class": None if opt is None else f"{type(opt).__module__}.{type(opt).__qualname__}",
        "peak_rss_gib": peak_kib * 1024 / GIB,
        "peak_rss_source": "VmHWM reset after setup" if hwm_kib is not None else "ru_maxrss (whole process)",
        "rss_ready_gib": None if rss_ready_kib is None else rss_ready_kib * 1024 / GIB,
        "s_per_step": statistics.median(times[params["warmup"] :]),
        "step_times_s": times,
        "losses": losses,
        "loss": losses[-1],
        "parameters": count_parameters(model),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------- parent
def package_version(optim: str | None) -> str:
    """``"<distribution> <version>"`` of the package that implements ``optim``."""
    if optim is None:
        return "–"
    from leantune.optim import is_competitor, is_fused

    if is_competitor(optim):
        from leantune.optim.competitors import COMPETITORS

        dist = COMPETITORS[optim].package
    else:
        dist = "leantune" if is_fused(optim) else "torch"
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (not installed)"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration over its repeats: medians, or the first error."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"error": failed[0]["error"], "detail": failed[0].get("detail"), "runs": runs}
    return {
        **runs[-1],
        "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in runs),
        "s_per_step": statistics.median(r["s_per_step"] for r in runs),
        "repeats": [{k: r[k] for k in ("peak_rss_gib", "s_per_step", "loss")} for r in runs],
    }


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    floor, adamw = results.get("floor") or {}, results.get("adamw") or {}
    for r in results.values():  # a failed run has no measurements: its ratios, and those to it, are None
        r["memory_vs_floor"] = ratio(r.get("peak_rss_gib"), floor.get("peak_rss_gib"))
        r["time_vs_floor"] = ratio(r.get("s_per_step"), floor.get("s_per_step"))
        r["memory_vs_adamw"] = ratio(r.get("peak_rss_gib"), adamw.get("peak_rss_gib"))


HEADERS = ["optimizer", "package/version", "peak RSS GiB", "s/step", "mem × floor", "time × floor",
           "mem × AdamW", "loss", "status"]  # fmt: skip
NOTES = [
    "floor: forward + backward with every gradient dropped as soon as it is accumulated, no update "
    "(weights + activations). The fused optimizers (adalomo, lomo) update inside `opt.backward(loss)`; "
    "the others run `loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`.",
    "Peak RSS: the kernel's high-water mark (VmHWM) over warmup + timed steps, reset after model and "
    "optimizer construction (so it covers the optimizer state, allocated at the first step, the weights "
    "and the interpreter). Workers run with `MALLOC_MMAP_THRESHOLD_=1048576`, the mmap threshold that "
    "`leantune train` fixes at start-up.",
    "GaLore recomputes its projections (an SVD per matrix) every `update_proj_gap` steps, the first at "
    "step 1; torchao's AdamW8bit/4bit compile their step (torch.compile) at the first step: with "
    "`--warmup 0` these costs are in the timed median.",
    "BAdam updates one transformer block at a time (the rest frozen) and expects bf16 weights (it warns "
    "in fp32). torchao quantises only tensors of 4096+ elements divisible by its block (256): on small "
    "presets most of its state stays fp32.",
]


def _row(name: str, r: dict[str, Any]) -> list[str]:
    status = "ok" if "error" not in r else f"failed: `{r['error']}`"
    return [name, r["package"], fmt(r.get("peak_rss_gib"), ".3f"), fmt(r.get("s_per_step"), ".3f"),
            fmt(r["memory_vs_floor"], ".2f"), fmt(r["time_vs_floor"], ".2f"),
            fmt(r["memory_vs_adamw"], ".2f"), fmt(r.get("loss"), ".4f"), status]  # fmt: skip


def format_markdown(report: dict[str, Any]) -> str:
    s, m, cfgs = report["setup"], report["machine"], report["configs"]
    load = f"{benchlib.format_load(report['load_before'])} and {benchlib.format_load(report['load_after'])}"
    lr = ", ".join(f"{n} {c['lr']:g}" for n, c in cfgs.items() if c["lr"] is not None)
    extra = "; ".join(f"{n} {c['kwargs']}" for n, c in cfgs.items() if c["kwargs"]) or "none"
    lines = [
        f"# Optimizer competitors: {s['preset']} {s['dtype']}, seq {s['seq']}, batch {s['batch']}",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}",
        f"- Machine: {m['cpu_model']}, {m['cpus']} CPUs, {fmt(m['ram_gib'], '.0f')} GiB RAM; torch "
        f"{m['torch']}, transformers {m['transformers']}, Python {m['python']}; {s['threads']} torch "
        f"threads; load before / after {load}",
        benchlib.source_note(report["source"]),
        f"- Steps: {s['warmup']} warmup + {s['steps']} timed per run, {s['repeats']} repeat(s) (medians "
        "over repeats), every run in a fresh subprocess",
        "",
        benchlib.render_table(HEADERS, [_row(n, r) for n, r in report["results"].items()], "llrrrrrrl"),
        "Notes:",
        "",
        *(f"- {note}" for note in NOTES),
        f"- Learning rates only keep the loss finite over a few steps: {lr}. Options: {extra}.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Peak RSS and s/step of AdaLomo vs its competitors.")
    benchlib.add_run_options(ap, list(CONFIGS), steps=3, warmup=1, timeout=7200.0)
    ap.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: the preset's)")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype (default: fp32)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report .md, .json next to it (default: results/competitors_<preset>_<dtype>.md)",
    )
    return ap




def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (parent) and return the report that was written."""
    from leantune.rss import MMAP_THRESHOLD

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        benchlib.emit_result(run_worker(json.loads(args.worker)))
        raise SystemExit(0)
    benchlib.check_run_options(args)
    names = benchlib.parse_only(args.only, list(CONFIGS))
    keys = ("preset", "vocab_size", "dtype", "seq", "batch", "steps", "warmup", "threads")
    setup = {k: getattr(args, k) for k in keys}
    configs = {n: {**setup, **CONFIGS[n]} for n in names}
    thr = str(args.threads)
    # MALLOC_MMAP_THRESHOLD_: what `leantune train` sets with mallopt at start-up (leantune.rss).
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": thr, "MKL_NUM_THREADS": thr,
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    load_before = benchlib.loadavg()
    progress = functools.partial(print, file=sys.stderr, flush=True)
    runs = benchlib.run_matrix(Path(__file__), configs, repeats=args.repeats, timeout=args.timeout,
                               progress=progress, env=env)  # fmt: skip
    results = {
        n: {"package": package_version(CONFIGS[n]["optim"]), **summarise(rs)} for n, rs in runs.items()
    }
    add_ratios(results)
    out = args.out or RESULTS / f"competitors_{args.preset}_{args.dtype}.md"
    report = {
        "benchmark": "competitors",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/competitors.py", *argv]),
        "setup": {**setup, "repeats": args.repeats, "env": env},
        "configs": {n: CONFIGS[n] for n in names},
        "machine": benchlib.machine(),
        "source": benchlib.source(),
        "load_before": load_before,
        "load_after": benchlib.loadavg(),
        "results": results,
    }
    markdown = format_markdown(report)
    benchlib.write_report(out, report, markdown)
    print(markdown)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
