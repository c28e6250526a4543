"""Forgetting: train on task family A, then on family B; how much of A survives, per method.

Stage 1 trains a model from a size preset (random init) on family A of the built-in tasks: full
fine-tuning with AdaLomo (lr 0.05), shared by every configuration. Stage 2 starts from stage 1's
final model and trains on family B with each configuration below, each in a *fresh subprocess*:

==================  ===========================================================================
``full_adamw``      full fine-tuning, ``torch.optim.AdamW`` (lr 3e-3)
``full_adalomo``    full fine-tuning, AdaLomo fused into backward (lr 0.05, as in stage 1)
``hft_adalomo``     HFT (``train.hft=true``: half of each block frozen at random) + AdaLomo (0.05)
``lora_adalomo``    LoRA (peft, all linear layers, r 8, alpha 16) + AdaLomo (0.05, orthogonal init)
``lora_adamw``      LoRA (peft, all linear layers, r 8, alpha 16) + AdamW (3e-3), the usual recipe
==================  ===========================================================================

Then ``--sweep`` configurations (default full AdaLomo and HFT + AdaLomo) run stage 2 again at the
``--sweep-lrs`` learning rates: a method can forget less simply because it learns less, and the
sweep shows forgetting against learning for both.

Reported per run: exact-match accuracy on held-out A prompts before stage 2 (stage 1's model) and
after, on held-out B prompts, the forgetting (A before - A after, in points), the trainable
fraction, optimizer state, training time and peak memory, with ratios to full fine-tuning with
AdaLomo measured in the same run. The held-out prompts are the trainer's own evaluation sets.

Memory is measured twice, because on the small learning model the interpreter dominates RSS:

* *learning runs*: peak RSS of the process during stage 2's training loop (the kernel high-water
  mark is reset when the loop starts) and its increase over the RSS at that point;
* *memory runs* (``--memory-preset``, default ``0.1b`` with its 32k vocabulary, random tokens,
  ``--memory-seq``): the same configurations built with the same library code
  (``leantune.adapters`` / ``leantune.hft`` / ``leantune.optim.build_optimizer``) on a larger
  model; peak RSS over ``--memory-steps`` training steps after one warm-up step, and s/step.

Run (from the repository root, venv active; about 12 minutes on 2 shared CPU cores)::

    python benchmarks/forgetting.py                          # reverse -> sort, preset tiny
    python benchmarks/forgetting.py --only full_adalomo,hft_adalomo --skip-memory --sweep-lrs ''
    python benchmarks/forgetting.py --task-a sort --task-b reverse --steps-b 200

Results: ``benchmarks/results/forgetting.{json,md,png}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import fmt, ratio
from leantune.rss import proc_status_kib, release_free_memory, reset_peak_rss

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "forgetting"
MIB = 1024**2


@dataclass(frozen=True)
class Setup:
    """One stage-2 configuration: its label and the ``leantune train`` overrides that make it."""

    name: str
    label: str
    overrides: tuple[str, ...]


SETUPS = {
    s.name: s
    for s in (
        Setup("full_adamw", "full FT, AdamW", ("optim.name=adamw", "optim.lr=3e-3")),
        Setup("full_adalomo", "full FT, AdaLomo", ("optim.name=adalomo", "optim.lr=0.05")),
        Setup("hft_adalomo", "HFT + AdaLomo", ("optim.name=adalomo", "optim.lr=0.05", "train.hft=true")),
        Setup(
            "lora_adalomo",
            "LoRA r8 + AdaLomo",
            ("optim.name=adalomo", "optim.lr=0.05", "peft.method=lora", "peft.r=8", "peft.alpha=16"),
        ),
        Setup(
            "lora_adamw",
            "LoRA r8 + AdamW",
            ("optim.name=adamw", "optim.lr=3e-3", "peft.method=lora", "peft.r=8", "peft.alpha=16"),
        ),
    )
}
REFERENCE = "full_adalomo"


# ----------------------------------------------------------------------------- process memory
def _state_bytes(optimizer: Any) -> int:
    import torch

    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


# ----------------------------------------------------------------------------- workers
def _accuracy(model: Any, tokenizer: Any, task: str, args: argparse.Namespace) -> float:
    """Exact match on the held-out prompts of ``task`` (the trainer's own evaluation set)."""
    import torch

    from leantune.config import DataConfig
    from leantune.data import build_datasets
    from leantune.evaluate import exact_match

    data = build_datasets(DataConfig(tasks=[task], num_train=1, num_eval=args.eval_samples), tokenizer)
    out = exact_match(
        model, tokenizer, data.eval, device=torch.device("cpu"), max_new_tokens=args.max_new_tokens
    )
    return out["acc"]


def _common(args: argparse.Namespace, work: Path) -> list[str]:
    return [
        f"model.preset={args.preset}",
        f"train.batch_size={args.batch}",
        f"data.num_eval={args.eval_samples}",
        "data.num_train=20000",
        "optim.warmup_steps=20",
        "eval.every=0",
        "eval.accuracy_samples=0",
        "log.every=50",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        f"train.output_dir={work}",
        f"train.seed={args.seed}",
    ]


def _learning_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 1 (worker ``stage1``) or one stage-2 configuration: train, then score A and B."""
    from leantune.config import load_config
    from leantune.trainer import Trainer

    work = Path(args.work)
    if args.worker == "stage1":
        overrides = [
            *_common(args, work),
            f"data.tasks={args.task_a}",
            f"train.max_steps={args.steps_a}",
            "optim.name=adalomo",
            "optim.lr=0.05",
            "train.run_name=stage1",
        ]
    else:
        name, _, lr = args.worker.partition("@")  # "hft_adalomo@0.02": another learning rate
        overrides = [
            *_common(args, work),
            f"model.path={work / 'stage1' / 'final'}",
            f"data.tasks={args.task_b}",
            f"train.max_steps={args.steps_b}",
            *SETUPS[name].overrides,
            *([f"optim.lr={lr}"] if lr else []),
            f"train.run_name={args.worker.replace('@', '-lr')}",
        ]

    class Measured(Trainer):
        """Resets the peak-RSS mark when the loop starts and reads it when the loop ends."""

        def train(self):
            release_free_memory()
            self.mem = {"peak_reset": reset_peak_rss(), "rss_start_kib": proc_status_kib("VmRSS")}
            return super().train()

        def evaluate(self):  # called once, right after the loop (eval.every=0): read the peak
            self.mem.setdefault("peak_kib", proc_status_kib("VmHWM"))
            return {}

    shutil.rmtree(work / overrides[-1].split("=", 1)[1], ignore_errors=True)  # its run directory
    trainer = Measured(load_config(None, overrides))
    summary = trainer.run()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    result = {
        "config": args.worker,
        "lr": float([o for o in overrides if o.startswith("optim.lr=")][-1].split("=", 1)[1]),
        "overrides": overrides,
        "steps": summary.steps,
        "train_seconds": summary.metrics["train_seconds"],
        "s_per_step": summary.metrics["train_seconds"] / max(summary.steps, 1),
        "tokens_per_s": summary.metrics["tokens_per_s"],
        "peak_rss_mib": trainer.mem["peak_kib"] / 1024,
        "rss_start_mib": trainer.mem["rss_start_kib"] / 1024,
        "train_rss_increase_mib": (trainer.mem["peak_kib"] - trainer.mem["rss_start_kib"]) / 1024,
        "peak_rss_source": "VmHWM reset at loop start" if trainer.mem["peak_reset"] else "VmHWM (process)",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "optimizer_state_mib": _state_bytes(trainer.optimizer) / MIB,
        "final_train_loss": _last_train_loss(summary.run_dir),
    }
    if trainer.hft is not None:
        result["hft_fraction"] = trainer.hft.report.fraction
    trainer.model.eval()
    result["acc_a"] = _accuracy(trainer.model, trainer.tokenizer, args.task_a, args)
    result["acc_b"] = _accuracy(trainer.model, trainer.tokenizer, args.task_b, args)
    return result


def _last_train_loss(run_dir: Path) -> float | None:
    from leantune.monitor import read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
    return losses[-1] if losses else None


def _memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration on a larger preset: peak RSS and s/step of a few training steps."""
    import torch

    from leantune import adapters, hft
    from leantune.config import load_config
    from leantune.models import build_model
    from leantune.optim import Stepper, build_optimizer, is_fused

    setup = SETUPS[args.worker.removeprefix("memory:")]
    cfg = load_config(None, list(setup.overrides))  # the same settings as the learning run
    model = build_model(preset=args.memory_preset, seed=0)
    model.config.use_cache = False
    if cfg.peft.method != "none":
        model = adapters.wrap_model(model, cfg.peft, optimizer=cfg.optim.name)
    if cfg.train.hft:
        hft.HftTracker(model, cfg.train.hft_seed)
    model.train()
    kwargs = {"lr": cfg.optim.lr}
    if is_fused(cfg.optim.name):
        opt = stepper = build_optimizer(cfg.optim.name, model, **kwargs)
    else:
        opt = build_optimizer(cfg.optim.name, model, **kwargs)
        stepper = Stepper(opt)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.memory_batch, args.memory_seq), generator=g)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        stepper.backward(loss)
        return float(loss.detach())

    step()  # warm-up: optimizer state is created here
    release_free_memory()
    rss_ready = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    times = []
    for _ in range(args.memory_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = proc_status_kib("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "config": setup.name,
        "preset": args.memory_preset,
        "seq": args.memory_seq,
        "batch": args.memory_batch,
        "peak_rss_mib": peak / 1024,
        "rss_ready_mib": rss_ready / 1024,
        "peak_rss_source": "VmHWM reset after warm-up" if reset else "VmHWM (process)",
        "s_per_step": sorted(times)[len(times) // 2],
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "optimizer_state_mib": _state_bytes(opt) / MIB,
    }


# ----------------------------------------------------------------------------- parent
WORKER_OPTIONS = (
    "preset",
    "task_a",
    "task_b",
    "steps_a",
    "steps_b",
    "batch",
    "eval_samples",
    "max_new_tokens",
    "seed",
    "memory_preset",
    "memory_seq",
    "memory_batch",
    "memory_steps",
)


def worker_spec(args: argparse.Namespace, worker: str) -> dict[str, Any]:
    """The ``--worker JSON`` of one run: ``worker`` (``stage1``, a setup name, ``NAME@LR`` for a
    sweep point or ``memory:NAME``), the run directory and the options in :data:`WORKER_OPTIONS`."""
    return {"worker": worker, "work": str(args.work), **{k: getattr(args, k) for k in WORKER_OPTIONS}}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One run in this process, from its :func:`worker_spec`."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = argparse.Namespace(**spec)
    return _memory_worker(args) if args.worker.startswith("memory:") else _learning_worker(args)


def _run(args: argparse.Namespace, worker: str) -> dict[str, Any]:
    """One run in a fresh process (:func:`benchlib.run_one`); a failed one ends the benchmark."""
    env = benchlib.thread_env(args.threads)
    result = benchlib.run_one(__file__, worker_spec(args, worker), label=worker, env=env)
    if "error" in result:
        raise SystemExit(f"worker {worker} failed: {result['detail']}")
    print(f"  {worker}: done in {result['process_wall_seconds']:.0f} s", flush=True)
    return result


def _vs(a: float | None, b: float | None) -> str:
    return fmt(ratio(a, b), ".2f", "×")


def _label(config: str) -> str:
    name, _, lr = config.partition("@")
    return SETUPS[name].label + (f", lr {lr}" if lr else "")


def _markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    a, b = s["task_a"], s["task_b"]
    stage1 = res["stage1"]
    rows = res["stage2"]
    ref = next((r for r in rows if r["config"] == REFERENCE), None)
    mem = {m["config"]: m for m in res.get("memory", [])}
    mref = mem.get(REFERENCE)
    before = stage1["acc_a"]
    out = [
        "# Forgetting: train on A, then on B",
        "",
        f"Built-in tasks: A = `{a}`, B = `{b}`. Preset `{s['preset']}` "
        f"({stage1['total_parameters']:,} parameters), batch {s['batch']}, seed {s['seed']}. "
        f"Stage 1: {s['steps_a']} steps on A from random init (full fine-tuning, AdaLomo lr 0.05). "
        f"Stage 2: {s['steps_b']} steps on B from stage 1's model (warmup 20, cosine to 10%), per "
        f"configuration, each in a fresh subprocess. Accuracy: greedy exact match on "
        f"{s['eval_samples']} held-out prompts per family (never trained on).",
        "",
        f"After stage 1: accuracy on A **{before:.1%}**, on B {stage1['acc_b']:.1%} "
        f"({stage1['train_seconds']:.0f} s training).",
        "",
        "| configuration | lr | trainable | acc A before | acc A after | forgetting (pts) | acc B | "
        "train s | time ×ref | peak RSS MiB | Δ RSS MiB | optimizer state MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        frac = r["trainable_parameters"] / r["total_parameters"]
        out.append(
            f"| {_label(r['config'])} | {r['lr']:g} | {frac:.1%} | {before:.1%} | {r['acc_a']:.1%} | "
            f"{100 * (before - r['acc_a']):.1f} | {r['acc_b']:.1%} | {r['train_seconds']:.0f} | "
            f"{_vs(r['train_seconds'], ref and ref['train_seconds'])} | {r['peak_rss_mib']:.0f} | "
            f"{r['train_rss_increase_mib']:.1f} | {r['optimizer_state_mib']:.2f} |"
        )
    sweep = res.get("sweep", [])
    if sweep:
        series = sorted({r["config"].partition("@")[0] for r in sweep})
        out += [
            "",
            "## Learning rate sweep: forgetting against learning",
            "",
            "The same stage 2 with other AdaLomo learning rates (the row at the main table's lr is "
            "repeated): a method that forgets less only because it learns less moves along the same "
            "curve.",
            "",
            "| configuration | lr | acc A after | forgetting (pts) | acc B | train s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in series:
            points = [r for r in [*sweep, *rows] if r["config"].partition("@")[0] == name]
            for r in sorted(points, key=lambda r: r["lr"]):
                out.append(
                    f"| {SETUPS[name].label} | {r['lr']:g} | {r['acc_a']:.1%} | "
                    f"{100 * (before - r['acc_a']):.1f} | {r['acc_b']:.1%} | {r['train_seconds']:.0f} |"
                )
    if mem:
        m0 = next(iter(mem.values()))
        out += [
            "",
            f"## Memory and time on a larger model (`{m0['preset']}`, {m0['total_parameters']:,} "
            f"parameters, fp32, batch {m0['batch']} × {m0['seq']} random tokens)",
            "",
            "| configuration | trainable | peak RSS GiB | memory ×ref | s/step | time ×ref "
            "| optimizer state MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, m in mem.items():
            frac = m["trainable_parameters"] / m["total_parameters"]
            out.append(
                f"| {SETUPS[name].label} | {frac:.1%} | {m['peak_rss_mib'] / 1024:.2f} | "
                f"{_vs(m['peak_rss_mib'], mref and mref['peak_rss_mib'])} | {m['s_per_step']:.2f} | "
                f"{_vs(m['s_per_step'], mref and mref['s_per_step'])} | {m['optimizer_state_mib']:.1f} |"
            )
    out += [
        "",
        "Notes:",
        "- forgetting = accuracy on A after stage 1 minus accuracy on A after stage 2 (points); "
        "ref = full fine-tuning with AdaLomo, measured in the same run.",
        "- Peak RSS of the learning runs: the process's high-water mark during stage 2's training loop "
        "(reset when the loop starts); Δ RSS = that peak minus the RSS when the loop started. On this "
        "small model the interpreter and libraries dominate RSS: the larger-model table is the memory "
        "comparison (peak over the timed steps, mark reset after one warm-up step that creates the "
        "optimizer state; s/step is the median).",
        "- LoRA: r 8, alpha 16, all linear layers (peft); with AdaLomo leantune's `peft.init=auto` "
        "picks peft's orthogonal init. HFT: seed 0; stage 1 did not use HFT, so stage 2 is the "
        "model's first HFT stage (index 0). Exact overrides of every run are in the JSON.",
        f"- Machine: {res['machine']['platform']}, {res['machine']['cpus']} CPUs shared with other "
        f"jobs, {s['threads']} thread(s) per run, load average (1/5/15 min) before "
        f"{res['machine']['load_before']}, after {res['machine']['load_after']}: times are noisy.",
    ]
    return "\n".join(out) + "\n"


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["stage2"]
    labels = [_label(r["config"]) for r in rows]
    x = list(range(len(rows)))
    panels = 3 + bool(res.get("memory"))
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.6))
    ax = axes[0]
    w = 0.27
    before = res["stage1"]["acc_a"]
    task_a, task_b = res["settings"]["task_a"], res["settings"]["task_b"]
    ax.bar([i - w for i in x], [before] * len(rows), w, label=f"A ({task_a}) before", color="#bbb")
    ax.bar(x, [r["acc_a"] for r in rows], w, label="A after stage 2", color="#d62728")
    ax.bar([i + w for i in x], [r["acc_b"] for r in rows], w, label=f"B ({task_b})", color="#1f77b4")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.05)
    ax.set_title("accuracy")
    ax.legend(fontsize=8)
    ax = axes[1]
    for r in [*rows, *res.get("sweep", [])]:
        name = r["config"].partition("@")[0]
        ax.scatter(r["acc_b"], r["acc_a"], label=SETUPS[name].label, color=f"C{list(SETUPS).index(name)}")
        ax.annotate(
            f"{r['lr']:g}", (r["acc_b"], r["acc_a"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.axhline(before, ls="--", lw=1, color="#999")
    ax.annotate("A before stage 2", (0, before), fontsize=7, xytext=(2, 3), textcoords="offset points")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlabel(f"accuracy on B ({task_b}) after stage 2")
    ax.set_ylabel(f"accuracy on A ({task_a}) after stage 2")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("retained A vs learned B (labels: lr)")
    ax = axes[2]
    ax.bar(x, [r["train_seconds"] for r in rows], color="#2ca02c")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(f"stage-2 training time ({res['settings']['steps_b']} steps)")
    if res.get("memory"):
        mem = res["memory"]
        ax = axes[3]
        ax.bar(range(len(mem)), [m["peak_rss_mib"] / 1024 for m in mem], color="#9467bd")
        ax.set_xticks(
            range(len(mem)), [SETUPS[m["config"]].label for m in mem], rotation=20, ha="right", fontsize=8
        )
        ax.set_ylabel("GiB")
        ax.set_title(f"peak RSS, preset {mem[0]['preset']} (seq {mem[0]['seq']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--task-a", default="reverse")
    p.add_argument("--task-b", default="sort")
    p.add_argument("--steps-a", type=int, default=300)
    p.add_argument("--steps-b", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(SETUPS)}")
    p.add_argument("--memory-preset", default="0.1b")
    p.add_argument("--memory-seq", type=int, default=128)
    p.add_argument("--memory-batch", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=1)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--sweep", default="full_adalomo,hft_adalomo", help="configurations re-run at --sweep-lrs")
    p.add_argument("--sweep-lrs", default="0.01,0.02", help="other stage-2 learning rates ('' = no sweep)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, help="run directories (default: a temporary directory, removed)")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        benchlib.emit_result(run_worker(json.loads(args.worker)))  # an exception: traceback, exit 1
        return 0

    names = list(SETUPS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}: choose from {', '.join(SETUPS)}")
    args.work, keep_work = benchlib.work_dir(args.work, "forgetting")
    load_before = benchlib.load_average()
    t0 = time.perf_counter()
    print(f"stage 1: {args.steps_a} steps on {args.task_a} ({args.preset})", flush=True)
    stage1 = _run(args, "stage1")
    print(f"  accuracy on {args.task_a}: {stage1['acc_a']:.1%}, on {args.task_b}: {stage1['acc_b']:.1%}")
    if stage1["acc_a"] < 0.2:
        print(f"warning: stage 1 learned {args.task_a} poorly ({stage1['acc_a']:.1%}): raise --steps-a")
    print(f"stage 2: {args.steps_b} steps on {args.task_b}", flush=True)
    stage2 = [_run(args, name) for name in names]
    lrs = [x.strip() for x in args.sweep_lrs.split(",") if x.strip()]
    swept = [n.strip() for n in args.sweep.split(",") if n.strip() in names] if lrs else []
    if swept:
        print(f"learning-rate sweep: {', '.join(swept)} at lr {', '.join(lrs)}", flush=True)
    sweep = [_run(args, f"{name}@{lr}") for name in swept for lr in lrs]
    memory = []
    if not args.skip_memory:
        print(f"memory: preset {args.memory_preset}, seq {args.memory_seq}", flush=True)
        memory = [_run(args, f"memory:{name}") for name in names]
    res = {
        "benchmark": "forgetting",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"
        },
        "setups": {n: {"label": SETUPS[n].label, "overrides": list(SETUPS[n].overrides)} for n in names},
        "stage1": stage1,
        "stage2": stage2,
        "sweep": sweep,
        "memory": memory,
        "total_seconds": time.perf_counter() - t0,
        "machine": {**benchlib.machine(), "load_before": load_before, "load_after": benchlib.load_average()},
    }
    md = _markdown(res)
    benchlib.write_report(args.out, res, md, indent=1)
    _plot(res, args.out.with_suffix(".png"))
    print()
    print(md)
    print(f"written: {args.out}.json/.md/.png ({res['total_seconds'] / 60:.1f} min)")
    if not keep_work:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
