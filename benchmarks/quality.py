"""Quality side by side: AdamW, AdaLomo, LOMO, Adafactor and SGD on the built-in instruction tasks.

Same model (preset ``tiny``, random init, seed 0), same data (the built-in tasks ``add, reverse,
sort, count``: 20000 generated training examples, 400 held-out evaluation prompts), same data order
and the same step budget (600 steps of batch 32, about a third of the default job's 800 x 64; warmup 30,
cosine to 10%) for every optimizer, each at its best learning rate from a small sweep:

============  ==================  ==========================================================
optimizer     lr sweep            notes
============  ==================  ==========================================================
AdamW         1e-3, 3e-3, 1e-2    ``torch.optim.AdamW`` (betas 0.9/0.999, wd 0), clip 1.0
AdaLomo       0.01, 0.03, 0.1     leantune, fused; lr relative to each tensor's RMS, no clip
LOMO          0.1, 0.3, 1.0       leantune, fused SGD; clip 1.0 (costs a 2nd backward)
Adafactor     0.01, 0.03, 0.1     ``torch.optim.Adafactor``: relative step min(lr, 1/sqrt(t)), no clip
SGD           0.1, 0.3, 1.0       ``torch.optim.SGD`` (no momentum), clip 1.0: LOMO's update
============  ==================  ==========================================================

The competitors of :mod:`leantune.optim.competitors` run with ``--only`` (AdamW's recipe: clip 1.0,
wd 0; results in ``results/quality_competitors.md``): GaLore and APOLLO (lr 3e-3, 1e-2, 3e-2; rank
32, a quarter of the hidden size), Adam-mini, AdamW 8-bit and 4-bit (3e-4, 1e-3, 3e-3), BAdam (1e-3,
3e-3, 1e-2; its defaults: one block at a time, switched every 50 steps).

SGD without momentum is the unfused twin of LOMO (same update rule): the two rows should agree up
to floating-point summation order, which checks the fused path; their time differs because LOMO's
exact clipping runs backward twice. Weight decay is 0 everywhere. Clipping by global norm 1.0 is
used where it is the usual recipe (AdamW) or needed (SGD, LOMO); AdaLomo and Adafactor bound their
update by RMS instead.

The best lr per optimizer is the one with the lowest final eval loss. When it lies at the edge of
its grid, the sweep is extended by one step beyond that edge on the 1-3-10 ladder (e.g. 1e-3 ->
3e-4), up to ``--extend`` times (a best lr still at the edge afterwards is flagged). The best lr of
AdamW, AdaLomo and Adafactor is then re-run with other seeds (``--confirm-seeds``: model init and
data order), so that AdaLomo's gap to AdamW is stated next to the seed-to-seed spread.

Each run is ``leantune train`` with the overrides listed in the JSON, executed in a *fresh
subprocess* through the :class:`leantune.trainer.Trainer` API so that the evaluations inside the
run compute only the eval loss (every ``--eval-every`` steps, for the curves); exact match is
scored once, at the end, on all held-out prompts (greedy, up to 16 new tokens). Time = the summed
training steps (forward, backward, update; evaluation excluded), with the median s/step.

Run (from the repository root, venv active; ~25 min on 2 quiet cores)::

    python benchmarks/quality.py
    python benchmarks/quality.py --quick                     # smoke test: tiny budget, 1 lr each
    python benchmarks/quality.py --only adamw,adalomo --steps 300 --confirm-seeds ''
    python benchmarks/quality.py --only adamw,adalomo,galore,apollo,adam_mini,badam,adamw8bit,adamw4bit \
        --confirm-seeds '' --out benchmarks/results/quality_competitors

Results: ``benchmarks/results/quality.{json,md,png}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import fmt

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quality"
TASKS = ["add", "reverse", "sort", "count"]


@dataclass(frozen=True)
class Optimizer:
    """One optimizer: its ``optim.name``, its lr grid and the overrides every run of it gets."""

    name: str
    label: str
    lrs: tuple[float, ...]
    overrides: tuple[str, ...] = ()


_CLIP = "optim.clip_grad_norm=1.0"
OPTIMIZERS: dict[str, Optimizer] = {
    o.name: o
    for o in (
        Optimizer("adamw", "AdamW", (1e-3, 3e-3, 1e-2), ("optim.clip_grad_norm=1.0",)),
        Optimizer("adalomo", "AdaLomo", (0.01, 0.03, 0.1)),
        Optimizer("lomo", "LOMO", (0.1, 0.3, 1.0), ("optim.clip_grad_norm=1.0",)),
        Optimizer("adafactor", "Adafactor", (0.01, 0.03, 0.1)),
        Optimizer("sgd", "SGD", (0.1, 0.3, 1.0), ("optim.clip_grad_norm=1.0",)),
        # The competitors (leantune.optim.competitors), AdamW's recipe otherwise. Rank 32 = a quarter
        # of the tiny preset's hidden size, the ratio of GaLore's and APOLLO's LLaMA runs.
        Optimizer("galore", "GaLore", (3e-3, 1e-2, 3e-2), (_CLIP, "optim.kwargs={rank: 32}")),
        Optimizer("apollo", "APOLLO", (3e-3, 1e-2, 3e-2), (_CLIP, "optim.kwargs={rank: 32}")),
        Optimizer("adam_mini", "Adam-mini", (3e-4, 1e-3, 3e-3), (_CLIP,)),
        Optimizer("badam", "BAdam", (1e-3, 3e-3, 1e-2), (_CLIP,)),
        Optimizer("adamw8bit", "AdamW 8-bit", (3e-4, 1e-3, 3e-3), (_CLIP,)),
        Optimizer("adamw4bit", "AdamW 4-bit", (3e-4, 1e-3, 3e-3), (_CLIP,)),
    )
}
# What `python benchmarks/quality.py` compares (results/quality.md); the competitors with --only.
DEFAULT = ("adamw", "adalomo", "lomo", "adafactor", "sgd")
QUICK = {"steps": 10, "batch": 8, "eval_every": 5, "num_train": 400, "num_eval": 32, "warmup": 2}


def _run_name(opt: str, lr: float, seed: int) -> str:
    return f"{opt}-lr{lr:g}-s{seed}"


def _overrides(s: dict[str, Any], opt: str, lr: float, seed: int) -> list[str]:
    return [
        f"model.preset={s['preset']}",
        f"data.tasks={','.join(s['tasks'])}",
        f"data.num_train={s['num_train']}",
        f"data.num_eval={s['num_eval']}",
        f"train.max_steps={s['steps']}",
        f"train.batch_size={s['batch']}",
        f"train.seed={seed}",
        f"optim.name={opt}",
        f"optim.lr={lr:g}",
        f"optim.warmup_steps={s['warmup']}",
        *OPTIMIZERS[opt].overrides,
        f"eval.every={s['eval_every']}",
        f"eval.accuracy_samples={s['num_eval']}",
        f"log.every={s['eval_every']}",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        f"train.output_dir={s['work']}",
        f"train.run_name={_run_name(opt, lr, seed)}",
    ]


# ----------------------------------------------------------------------------- worker
def run_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Train one (optimizer, lr, seed) in this process and return its metrics and curves."""
    import torch

    from leantune.config import load_config
    from leantune.evaluate import eval_loss
    from leantune.monitor import read_metrics
    from leantune.trainer import Trainer

    s = params["settings"]
    opt, lr, seed = params["optimizer"], float(params["lr"]), int(params["seed"])
    torch.set_num_threads(s["threads"])

    class Timed(Trainer):
        """Times each training step; evaluations inside the run compute the loss only."""

        step_s: list[float]
        step_cpu_s: list[float]

        def train_step(self) -> dict[str, Any]:
            t0, c0 = time.perf_counter(), time.process_time()
            out = super().train_step()
            self.step_s.append(time.perf_counter() - t0)
            self.step_cpu_s.append(time.process_time() - c0)
            return out

        def evaluate(self) -> dict[str, Any]:
            if self.step < self.total_steps:
                self.last_eval = eval_loss(
                    self.model,
                    self.data.eval,
                    batch_size=self.cfg.train.batch_size,
                    pad_id=self.tokenizer.pad_token_id,
                    device=self.device,
                )
                return self.last_eval
            return super().evaluate()

    overrides = _overrides(s, opt, lr, seed)
    shutil.rmtree(Path(s["work"]) / _run_name(opt, lr, seed), ignore_errors=True)
    trainer = Timed(load_config(None, overrides))
    trainer.step_s, trainer.step_cpu_s = [], []
    summary = trainer.run()
    m = summary.metrics
    rows = read_metrics(summary.run_dir)
    curve = [
        [r["step"], r["eval_loss"]] for r in rows if r.get("kind") == "eval" and r["step"] < summary.steps
    ]
    curve.append([summary.steps, m["eval_loss"]])
    return {
        "optimizer": opt,
        "lr": lr,
        "seed": seed,
        "overrides": overrides,
        "command": "leantune train " + " ".join(shlex.quote(o) for o in overrides),
        "steps": summary.steps,
        "eval_loss": m["eval_loss"],
        "eval_ppl": m["eval_ppl"],
        "acc": m.get("acc"),
        "acc_samples": m.get("acc_samples"),
        **{k: v for k, v in m.items() if k.startswith("acc/")},
        "eval_curve": curve,
        "train_curve": [[r["step"], r["loss"]] for r in rows if r.get("kind") == "train"],
        "skipped_steps": trainer.nonfinite_total,
        "step_seconds": sum(trainer.step_s),
        "s_per_step": statistics.median(trainer.step_s),
        "step_cpu_seconds": sum(trainer.step_cpu_s),
        "cpu_s_per_step": statistics.median(trainer.step_cpu_s),
        "train_seconds_with_evals": m["train_seconds"],
        "peak_mem_mib": m["peak_mem_bytes"] / 1024**2,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }


# ----------------------------------------------------------------------------- parent
def _run_child(settings: dict[str, Any], opt: str, lr: float, seed: int, timeout: float) -> dict[str, Any]:
    payload = {"settings": settings, "optimizer": opt, "lr": lr, "seed": seed}
    name = _run_name(opt, lr, seed)
    env = benchlib.thread_env(settings["threads"])
    res = benchlib.run_one(__file__, payload, label=name, timeout=timeout, env=env)
    if "error" in res:
        print(f"  {name}: FAILED ({res['error']})", flush=True)
        return {"optimizer": opt, "lr": lr, "seed": seed, "ok": False, **res}
    res["ok"] = True
    print(
        f"  {name}: eval loss {res['eval_loss']:.4f}, exact match {res['acc']:.1%} "
        f"({res['process_wall_seconds']:.0f} s)",
        flush=True,
    )
    return res


def _run_all(settings: dict[str, Any], jobs: list[tuple[str, float, int]], args: argparse.Namespace):
    """The runs in order; ``--jobs N`` runs N subprocesses at once (quick checks only: concurrent runs
    share the cores, so their times are not comparable)."""
    if args.jobs <= 1:
        return [_run_child(settings, opt, lr, seed, args.timeout) for opt, lr, seed in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda job: _run_child(settings, *job, args.timeout), jobs))


def next_lr(lr: float, *, down: bool) -> float:
    """The next learning rate on the 1-3-10 ladder below or above ``lr`` (1e-3 -> 3e-4 or 3e-3)."""
    exp = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exp  # in [1, 10)
    if down:
        new = 3 * 10 ** (exp - 1) if mantissa < 2 else 10**exp
    else:
        new = 3 * 10**exp if mantissa < 2 else 10 ** (exp + 1)
    return float(f"{new:.3g}")


def _finite(r: dict[str, Any]) -> bool:
    return bool(r.get("ok")) and math.isfinite(r.get("eval_loss", math.nan))


def select_best(runs: list[dict[str, Any]], grids: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """The seed-0 run with the lowest final eval loss per optimizer, flagged when at a grid edge."""
    best = {}
    for opt, grid in grids.items():
        cands = [r for r in runs if r["optimizer"] == opt and r["seed"] == 0 and _finite(r)]
        if not cands:
            continue
        b = min(cands, key=lambda r: r["eval_loss"])
        edge = None
        if len(grid) > 1 and b["lr"] == min(grid):
            edge = "lowest"
        elif len(grid) > 1 and b["lr"] == max(grid):
            edge = "highest"
        best[opt] = {**b, "edge": edge}
    return best


def _seed_stats(runs: list[dict[str, Any]], opt: str, lr: float) -> dict[str, Any] | None:
    same = [r for r in runs if r["optimizer"] == opt and r["lr"] == lr and _finite(r)]
    if len(same) < 2:
        return None
    out: dict[str, Any] = {"seeds": sorted(r["seed"] for r in same)}
    for key in ("eval_loss", "acc"):
        vals = [r[key] for r in same]
        out[key] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals), "values": vals}
    return out


def summarize(runs: list[dict[str, Any]], grids: dict[str, list[float]]) -> dict[str, Any]:
    best = select_best(runs, grids)
    seeds = {opt: _seed_stats(runs, opt, b["lr"]) for opt, b in best.items()}
    gap = None
    if "adamw" in best and "adalomo" in best:
        a, w = best["adalomo"], best["adamw"]
        gap = {
            "eval_loss_diff": a["eval_loss"] - w["eval_loss"],
            "eval_loss_ratio": a["eval_loss"] / w["eval_loss"],
            "acc_diff_points": 100 * (a["acc"] - w["acc"]),
            **{f"acc_diff_points/{t}": 100 * (a.get(f"acc/{t}", 0) - w.get(f"acc/{t}", 0)) for t in TASKS},
        }
        if seeds.get("adamw") and seeds.get("adalomo"):
            sa, sw = seeds["adalomo"], seeds["adamw"]
            gap["seed_mean_eval_loss_diff"] = sa["eval_loss"]["mean"] - sw["eval_loss"]["mean"]
            gap["seed_mean_acc_diff_points"] = 100 * (sa["acc"]["mean"] - sw["acc"]["mean"])
            gap["seed_sd_eval_loss"] = {"adalomo": sa["eval_loss"]["sd"], "adamw": sw["eval_loss"]["sd"]}
            gap["seed_sd_acc_points"] = {"adalomo": 100 * sa["acc"]["sd"], "adamw": 100 * sw["acc"]["sd"]}
    return {"runs": runs, "best": best, "seed_stats": seeds, "adalomo_vs_adamw": gap}


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def format_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    best = report["best"]
    tasks = s["tasks"]
    m = report["machine"]
    params = next((r["parameters"] for r in report["runs"] if r.get("ok")), None)
    labels = [OPTIMIZERS[o].label for o in s["grids"]]
    clipped = [OPTIMIZERS[o].label for o in s["grids"] if _CLIP in OPTIMIZERS[o].overrides]
    unclipped = [x for x in labels if x not in clipped]
    out = [
        f"# Quality: {', '.join(labels)} on the built-in instruction tasks",
        "",
        f"Preset `{s['preset']}` ({fmt(params, ',')} parameters, random init), built-in tasks "
        f"`{', '.join(tasks)}` ({s['num_train']} training examples, {s['num_eval']} held-out prompts), "
        f"{s['steps']} steps of batch {s['batch']}, warmup {s['warmup']}, cosine to 10%, seed 0, fp32, "
        f"{s['threads']} thread(s) per run, each run in a fresh subprocess."
        + (" **Quick mode: a smoke test, not a result.**" if s["quick"] else ""),
        "",
        "| optimizer | lr sweep | best lr | eval loss | ppl | "
        + " | ".join(f"exact match {t}" for t in tasks)
        + " | exact match all | train s | CPU s/step |",
        "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: |",
    ]
    for opt, grid in s["grids"].items():
        b = best.get(opt)
        sweep = ", ".join(f"{lr:g}" for lr in grid)
        if b is None:
            out.append(
                f"| {OPTIMIZERS[opt].label} | {sweep} | every run failed or diverged |"
                + " |" * (len(tasks) + 5)
            )
            continue
        edge = f" ({b['edge']} of grid)" if b["edge"] else ""
        out.append(
            f"| {OPTIMIZERS[opt].label} | {sweep} | {b['lr']:g}{edge} | {b['eval_loss']:.4f} | "
            f"{b['eval_ppl']:.3f} | "
            + " | ".join(fmt(b.get(f"acc/{t}"), ".1%") for t in tasks)
            + f" | {fmt(b['acc'], '.1%')} | {b['step_seconds']:.0f} | {b['cpu_s_per_step']:.3f} |"
        )
    extended = s.get("extended") or {}
    if extended:
        out += [
            "",
            "Sweep extended because the best lr lay at the edge of the initial grid: "
            + "; ".join(
                f"{OPTIMIZERS[o].label} {', '.join(f'{x:g}' for x in lrs)} (initial grid "
                f"{', '.join(f'{x:g}' for x in s['initial_grids'][o])})"
                for o, lrs in extended.items()
            )
            + ".",
        ]
    gap = report.get("adalomo_vs_adamw")
    if gap:
        line = (
            f"**AdaLomo vs AdamW** (best lr each, seed 0): eval loss {gap['eval_loss_diff']:+.4f} "
            f"({gap['eval_loss_ratio']:.3f}× AdamW's), exact match {gap['acc_diff_points']:+.1f} points ("
            + ", ".join(f"{t} {gap[f'acc_diff_points/{t}']:+.1f}" for t in tasks)
            + ")."
        )
        if "seed_mean_eval_loss_diff" in gap:
            sd_l, sd_a = gap["seed_sd_eval_loss"], gap["seed_sd_acc_points"]
            seeds = report["seed_stats"]["adalomo"]["seeds"]
            line += (
                f" Over seeds {', '.join(map(str, seeds))} (init and data order): eval loss "
                f"{gap['seed_mean_eval_loss_diff']:+.4f} on average (seed sd AdaLomo {sd_l['adalomo']:.4f}, "
                f"AdamW {sd_l['adamw']:.4f}), exact match {gap['seed_mean_acc_diff_points']:+.1f} points "
                f"(sd {sd_a['adalomo']:.1f} / {sd_a['adamw']:.1f})."
            )
        out += ["", line]
    stats = {k: v for k, v in report["seed_stats"].items() if v}
    if stats:
        out += [
            "",
            "| optimizer (best lr) | seeds | eval loss mean ± sd | exact match mean ± sd "
            "| per seed (loss / match) |",
            "| --- | --- | ---: | ---: | --- |",
        ]
        for opt, st in stats.items():
            per = ", ".join(
                f"{loss:.4f} / {acc:.1%}" for loss, acc in zip(st["eval_loss"]["values"], st["acc"]["values"])
            )
            out.append(
                f"| {OPTIMIZERS[opt].label} ({best[opt]['lr']:g}) | {', '.join(map(str, st['seeds']))} | "
                f"{st['eval_loss']['mean']:.4f} ± {st['eval_loss']['sd']:.4f} | "
                f"{st['acc']['mean']:.1%} ± {100 * st['acc']['sd']:.1f} pts | {per} |"
            )
    out += [
        "",
        "## The sweep (seed 0)",
        "",
        "| optimizer | lr | eval loss | exact match | CPU s/step | skipped steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = list(OPTIMIZERS)
    for r in sorted(report["runs"], key=lambda r: (order.index(r["optimizer"]), r["lr"])):
        if r["seed"] != 0:
            continue
        label = OPTIMIZERS[r["optimizer"]].label
        if not r.get("ok"):
            out.append(f"| {label} | {r['lr']:g} | failed | | | |")
            continue
        mark = " **best**" if best.get(r["optimizer"], {}).get("lr") == r["lr"] else ""
        out.append(
            f"| {label} | {r['lr']:g}{mark} | {r['eval_loss']:.4f} | {fmt(r['acc'], '.1%')} | "
            f"{r['cpu_s_per_step']:.3f} | {r['skipped_steps']} |"
        )
    load = tuple(benchlib.format_load(x) for x in (m["load_before"], m["load_after"]))
    out += [
        "",
        "Notes:",
        f"- Selection: lowest final eval loss on the held-out prompts of seed 0 (the same {s['num_eval']} "
        f"prompts score exact match, one answer = {100 / s['num_eval']:.2g} points; selecting on the "
        f"evaluation set favours every optimizer alike). {_and(clipped)} use `clip_grad_norm=1.0`"
        + (f"; {_and(unclipped)} none." if unclipped else ".")
        + (
            " Adafactor is `torch.optim.Adafactor`, whose relative step is min(lr, 1/sqrt(t)): an lr above "
            f"1/sqrt({s['steps']}) ≈ {s['steps'] ** -0.5:.2g} is capped late in the run, unlike AdaLomo's."
            if "adafactor" in s["grids"]
            else ""
        )
        + (
            " GaLore and APOLLO project the decoder's linear layers at rank 32 (`optim.kwargs`); BAdam "
            "trains one decoder block at a time with its defaults (switch every 50 steps, embeddings and "
            "the tied head frozen: made for fine-tuning, here from a random init)."
            if set(s["grids"]) & {"galore", "apollo", "badam"}
            else ""
        ),
        "- Time: train s = wall-clock sum of the training steps (forward, backward, update; evaluation "
        "excluded); CPU s/step = median process CPU time of a step (one torch thread: the work itself, "
        "less disturbed by other processes). LOMO's exact global-norm clipping runs backward twice, SGD "
        "clips after a single backward (same update).",
        f"- Machine: {m['platform']}, {m['cpu_model']}, {m['cpus']} CPUs shared with other jobs, load "
        f"average (1/5/15 min) before {load[0]}, after {load[1]}: times are indicative. "
        f"Total {report['total_seconds'] / 60:.1f} min. Command: `{report['command']}`; every run's "
        "`leantune train` overrides are in the JSON.",
        benchlib.source_note(report.get("source")),
    ]
    if s.get("jobs", 1) > 1:
        out.append(
            f"- **{s['jobs']} runs at a time** (`--jobs`): they shared the cores, times are not comparable."
        )
    for r in report["runs"]:
        if not r.get("ok"):
            last = (r.get("error") or "?").strip().splitlines()[-1:] or ["?"]
            out.append(f"- **{_run_name(r['optimizer'], r['lr'], r['seed'])} failed**: `{last[0]}`")
    return "\n".join(out) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (opt, b) in enumerate(report["best"].items()):
        xs, ys = zip(*b["eval_curve"])
        ls = "--" if opt == "sgd" else "-"  # SGD is LOMO's twin: dashed so both stay visible
        ax.plot(
            xs,
            ys,
            ls=ls,
            color=f"C{i}",
            label=f"{OPTIMIZERS[opt].label} lr {b['lr']:g} ({b['eval_loss']:.3f})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_yscale("log")
    ax.set_title("eval loss, best lr per optimizer")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    for i, opt in enumerate(report["best"]):
        pts = sorted(
            (r["lr"], r["eval_loss"])
            for r in report["runs"]
            if r["optimizer"] == opt and r["seed"] == 0 and _finite(r)
        )
        if pts:
            ax2.plot(*zip(*pts), marker="o", color=f"C{i}", label=OPTIMIZERS[opt].label)
    ax2.set_xscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel("final eval loss")
    ax2.set_title("learning-rate sweep (seed 0)")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default: 600)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50, help="loss-only evaluations for the curves")
    p.add_argument(
        "--only",
        help=f"comma-separated subset of {', '.join(OPTIMIZERS)} (default: {','.join(DEFAULT)})",
    )
    for o in OPTIMIZERS.values():
        p.add_argument(
            f"--{o.name}-lrs",
            type=_floats,
            help=f"{o.label} lr grid (default: {','.join(f'{x:g}' for x in o.lrs)})",
        )
    p.add_argument(
        "--extend", type=int, default=2, help="max grid extensions when a best lr is at an edge (default: 2)"
    )
    p.add_argument(
        "--confirm",
        default="adamw,adalomo,adafactor",
        help="optimizers re-run at their best lr with other seeds",
    )
    p.add_argument("--confirm-seeds", default="1,2", help="seeds of those re-runs ('' = none)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budget, the middle lr of each grid")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1; >1 makes times meaningless)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, help="run directories (default: a temporary directory, removed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        benchlib.emit_result(run_worker(json.loads(args.worker)))
        return 0
    names = list(DEFAULT) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in OPTIMIZERS:
            close = difflib.get_close_matches(n, list(OPTIMIZERS), n=1)
            parser.error(f"unknown optimizer {n!r}.{f' Did you mean {close[0]!r}?' if close else ''}")
    grids = {n: list(getattr(args, f"{n}_lrs") or OPTIMIZERS[n].lrs) for n in names}
    confirm_seeds = [int(x) for x in args.confirm_seeds.split(",") if x.strip()]
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        grids = {n: [g[len(g) // 2]] for n, g in grids.items()}
        confirm_seeds = []
    args.work, keep_work = benchlib.work_dir(args.work, "quality")
    settings = {
        k: getattr(args, k)
        for k in (
            "preset",
            "steps",
            "batch",
            "warmup",
            "num_train",
            "num_eval",
            "eval_every",
            "threads",
            "quick",
        )
    }
    settings.update(
        tasks=TASKS,
        work=str(args.work),
        initial_grids={k: list(v) for k, v in grids.items()},
        grids=grids,
        extended={},
        confirm_seeds=confirm_seeds,
        jobs=args.jobs,
    )
    load_before = benchlib.loadavg()
    t0 = time.perf_counter()
    n_runs = sum(len(g) for g in grids.values())
    print(f"sweep: {n_runs} runs of {args.steps} steps ({', '.join(names)})", flush=True)
    runs = _run_all(settings, [(opt, lr, 0) for opt, grid in grids.items() for lr in grid], args)
    for _ in range(args.extend):  # a best lr at the edge of its grid: try one step beyond it
        edges = {opt: b for opt, b in select_best(runs, grids).items() if b["edge"]}
        if not edges:
            break
        more = [(opt, next_lr(b["lr"], down=b["edge"] == "lowest"), 0) for opt, b in edges.items()]
        for opt, lr, _seed in more:
            grids[opt] = sorted([*grids[opt], lr])
            settings["extended"].setdefault(opt, []).append(lr)
        print(
            "best lr at a grid edge, extending: " + ", ".join(f"{o} {lr:g}" for o, lr, _ in more), flush=True
        )
        runs += _run_all(settings, more, args)
    best = select_best(runs, grids)
    confirm = [n.strip() for n in args.confirm.split(",") if n.strip() in best]
    if confirm_seeds and confirm:
        print(f"seeds {confirm_seeds} at the best lr of {', '.join(confirm)}", flush=True)
        runs += _run_all(
            settings, [(opt, best[opt]["lr"], seed) for opt in confirm for seed in confirm_seeds], args
        )
    report = summarize(runs, grids)
    report.update(
        {
            "benchmark": "quality",
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python benchmarks/quality.py "
            + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "settings": settings,
            "optimizers": {
                n: {"label": OPTIMIZERS[n].label, "overrides": list(OPTIMIZERS[n].overrides)} for n in names
            },
            "total_seconds": time.perf_counter() - t0,
            "machine": {**benchlib.machine(), "load_before": load_before, "load_after": benchlib.loadavg()},
            "source": benchlib.source(),
        }
    )
    md = format_markdown(report)
    benchlib.write_report(args.out, report, md, indent=1)
    if report["best"]:
        _plot(report, args.out.with_suffix(".png"))
    print()
    print(md)
    print(f"written: {args.out}.json/.md/.png ({report['total_seconds'] / 60:.1f} min)")
    if not keep_work:
        shutil.rmtree(args.work, ignore_errors=True)
    return report


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
