"""Peak memory and time per training step of every optimizer, against the physical floor.

On a LLaMA-shaped model (random init, ``leantune.models`` preset, default ``0.37b``) and one fixed
random batch, each configuration runs in a *fresh subprocess* (so allocator state, optimizer state
and peak-RSS counters never leak from one configuration into the next) and reports:

* peak resident memory (RSS) during training, and the process-lifetime peak,
* seconds per step (median and mean of ``time.perf_counter`` around forward + backward + update),
* the final loss and the parameter count,

then the parent prints a table with ratios to the floor and to AdamW, all measured in the same run,
and writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``benchmarks/results/optim_step``).

Configurations (``--only`` takes these names):

=====================  ===========================================================================
``floor``              forward + backward, each gradient dropped as soon as it is accumulated
                       (``register_post_accumulate_grad_hook`` sets ``p.grad = None``), no update:
                       weights + activations, the memory/time no optimizer can beat
``sgd`` ``adamw``      ``torch.optim`` defaults: ``loss.backward(); opt.step(); opt.zero_grad()``
``adafactor``          ``torch.optim.Adafactor``, same loop
``lomo`` ``adalomo``   leantune, fused into backward: ``opt.backward(loss)``
``adamw_in_backward``  leantune ``InBackward(torch.optim.AdamW)``
``lomo_optim_lomo``    the official ``lomo-optim`` package (``Lomo`` / ``AdaLomo``), used as its
``lomo_optim_adalomo`` README says: ``opt.fused_backward(loss, lr)`` (no clipping, so no
                       ``opt.grad_norm(loss)`` pass). Its ``AdaLomo`` allocates state with
                       ``.cuda()``; on a CPU-only torch the worker patches ``torch.Tensor.cuda`` to
                       the identity *during the constructor only* and records that in the results.
=====================  ===========================================================================

No configuration clips gradients (clipping by global norm costs every fused optimizer an extra
backward, which is a different benchmark).

Precision (``--dtype``): ``fp32`` or ``bf16`` weights (and gradients, state, activations), or
``mixed``: bf16 mixed precision with fp32 master weights (fp32 weights, gradients and optimizer
state; the forward runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``). Activation
checkpointing (``--grad-checkpointing``) is transformers' non-reentrant per-layer checkpointing.
Each result also splits the step into forward and backward + update (``forward_times_s``,
``backward_update_times_s``) and records the model construction (``build_s``, and
``build_peak_rss_gib``: the high-water mark of imports + construction, before the reset).

How peak memory is measured: after the model and batch are built the worker returns freed heap to
the OS (``malloc_trim``) and resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``),
so ``peak_rss`` is the largest RSS over the warmup + timed steps (it includes the resident weights,
the optimizer state and the interpreter); the JSON also splits it into warmup and timed steps.
``process_peak_rss`` is the whole process's peak (imports, model construction and the steps: the
larger of the high-water mark before the reset and the peaks after it); it is the headline only
when the reset is not permitted. (``ru_maxrss`` is recorded too, but the kernel derives it from the
same high-water mark, so after a reset it no longer covers model construction.) RSS also counts
heap that glibc keeps after a free, so a few tens of MiB between configurations can be allocator
noise rather than live tensors.

Run (from the repository root, venv active)::

    python benchmarks/optim_step.py                      # 0.37b, fp32, seq 512, batch 1, all configs
    python benchmarks/optim_step.py --preset 0.1b --seq 256 --steps 2 --warmup 1   # smoke run
    python benchmarks/optim_step.py --only floor,adalomo,lomo_optim_adalomo --repeats 3

Use a quiet machine: the configurations run one after another, so background load shows up as noise
in the time ratios (``--repeats`` interleaves the configurations and takes medians; the load average
before and after is recorded in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import fmt, ratio
from leantune.rss import proc_status_kib, release_free_memory, reset_peak_rss

GIB = 1024**3
DTYPES = ("fp32", "bf16", "mixed")  # mixed: fp32 (master) weights, gradients, state; bf16 autocast
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "optim_step"
TARGETS = {"memory_vs_floor": 1.05, "time_vs_floor": 1.10}  # for leantune AdaLomo


@dataclass(frozen=True)
class Config:
    """One benchmarked configuration: how the worker builds its optimizer and runs a step."""

    name: str
    label: str
    kind: str  # "floor" | "torch" | "leantune" | "lomo_optim"
    optimizer: str | None = None  # build_optimizer name, or the lomo-optim class name
    kwargs: dict[str, Any] = field(default_factory=dict)


# Learning rates only keep the losses finite over a few steps (NaN/denormal arithmetic would
# distort the timings); they do not affect the cost of a step.
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("floor", "floor: fwd+bwd, grads dropped", "floor"),
        Config("sgd", "SGD (torch)", "torch", "sgd", {"lr": 1e-3}),
        Config("adamw", "AdamW (torch)", "torch", "adamw", {"lr": 1e-4}),
        Config("adafactor", "Adafactor (torch)", "torch", "adafactor", {}),
        Config("lomo", "LOMO (leantune)", "leantune", "lomo", {"lr": 1e-3}),
        Config("adalomo", "AdaLomo (leantune)", "leantune", "adalomo", {"lr": 1e-3}),
        Config(
            "adamw_in_backward", "AdamW in backward (leantune)", "leantune", "adamw_in_backward", {"lr": 1e-4}
        ),
        Config("lomo_optim_lomo", "LOMO (lomo-optim)", "lomo_optim", "Lomo", {"lr": 1e-3}),
        Config("lomo_optim_adalomo", "AdaLomo (lomo-optim)", "lomo_optim", "AdaLomo", {"lr": 1e-3}),
    )
}


# --------------------------------------------------------------------------------------- worker
def _gib(kib: int | None) -> float | None:
    return None if kib is None else kib * 1024 / GIB


def _drop_grad(p) -> None:
    p.grad = None


def _make_update(cfg: Config, model) -> tuple[Callable[[Any], None], list[str]]:
    """Build the optimizer of ``cfg``; return ``update(loss)`` (backward + update) and report notes."""
    import torch

    from leantune.optim import build_optimizer

    notes: list[str] = []
    if cfg.kind == "floor":
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_drop_grad)

        def update(loss):
            loss.backward()

        return update, notes

    if cfg.kind == "torch":
        opt = build_optimizer(cfg.optimizer, model, **cfg.kwargs)

        def update(loss):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return update, notes

    if cfg.kind == "leantune":
        opt = build_optimizer(cfg.optimizer, model, **cfg.kwargs)

        def update(loss):
            opt.backward(loss)

        return update, notes

    if cfg.kind == "lomo_optim":
        import lomo_optim

        cls = getattr(lomo_optim, cfg.optimizer)
        lr = cfg.kwargs["lr"]
        try:
            opt = cls(model, **cfg.kwargs)
        except (AssertionError, RuntimeError) as err:
            if torch.cuda.is_available() or "CUDA" not in str(err):
                raise
            # Its AdaLomo allocates every state tensor with .cuda(). The constructor raises on the
            # first one, before registering any hook, so retrying on the same model is clean.
            original = torch.Tensor.cuda
            torch.Tensor.cuda = lambda self, *args, **kwargs: self  # keep the state on the CPU
            try:
                opt = cls(model, **cfg.kwargs)
            finally:
                torch.Tensor.cuda = original
            notes.append(
                f"lomo-optim {lomo_optim.__version__} {cfg.optimizer}() as installed fails on a CPU-only "
                f"torch with `{type(err).__name__}: {err}` (its constructor allocates the second-moment "
                "state with `.cuda()`); run here with `torch.Tensor.cuda` patched to the identity "
                "during the constructor only, so the state lives on the CPU (package files untouched)"
            )
        if getattr(opt, "loss_scale", None):
            notes.append(f"{cfg.optimizer} default loss_scale={opt.loss_scale} kept (applied in fp32 too)")

        def update(loss):
            opt.fused_backward(loss, lr)

        return update, notes

    raise ValueError(f"unknown configuration kind {cfg.kind!r}")


def _forward(model, ids, *, mixed: bool = False):
    """The loss of one batch; the model output (logits) dies here, before backward."""
    import torch

    if not mixed:
        return model(input_ids=ids, labels=ids).loss
    # bf16 mixed precision with fp32 master weights: linears run in bf16 on cached bf16 copies of the
    # fp32 weights; gradients reach the fp32 weights, so every optimizer sees fp32 tensors.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids, labels=ids).loss


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers' API).

    transformers 5 renamed ``gradient_checkpointing_enable`` (deprecated, a FutureWarning) to
    ``activation_checkpointing_enable``; both default to ``use_reentrant=False`` there, which is
    passed explicitly for transformers 4.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def run_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process and return its measurements.

    ``params`` holds ``config`` (a :data:`CONFIGS` key), ``preset``, ``seq``, ``batch``, ``steps``,
    ``warmup``, ``dtype`` (``"fp32"``, ``"bf16"``, or ``"mixed"``: fp32 weights, forward under bf16
    autocast), ``grad_checkpointing`` (non-reentrant activation checkpointing) and ``threads``.
    Cheap on a tiny preset, so tests call it directly.
    """
    import resource

    import torch

    from leantune.models import build_model, count_parameters, resolve_dtype

    cfg = CONFIGS[params["config"]]
    mixed = params["dtype"] == "mixed"
    torch.set_num_threads(int(params["threads"]))
    t_build = time.perf_counter()
    # build_model initialises presets above 1B parameters directly in a low-precision dtype.
    model = build_model(
        preset=params["preset"], dtype=resolve_dtype("fp32" if mixed else params["dtype"]), seed=0
    )
    build_s = time.perf_counter() - t_build
    model.config.use_cache = False
    model.train()
    if params.get("grad_checkpointing"):
        enable_checkpointing(model)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.config.vocab_size, (params["batch"], params["seq"]), generator=gen)
    update, notes = _make_update(cfg, model)

    release_free_memory()
    rss_ready_kib = proc_status_kib("VmRSS")
    build_hwm_kib = proc_status_kib("VmHWM")  # imports + model construction (+ optimizer setup)
    peak_reset = reset_peak_rss()
    times: list[float] = []
    forward_times: list[float] = []
    cpu_times: list[float] = []
    losses: list[float] = []
    warmup_hwm_kib = None
    for i in range(params["warmup"] + params["steps"]):
        if i == params["warmup"] and peak_reset:
            # Split the peak: the first steps allocate optimizer state and settle the allocator.
            warmup_hwm_kib = proc_status_kib("VmHWM")
            reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = _forward(model, ids, mixed=mixed)
        forward_times.append(time.perf_counter() - t0)
        update(loss)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(float(loss.detach()))
        del loss
    timed = times[params["warmup"] :]
    cpu_timed = cpu_times[params["warmup"] :]

    hwm_kib = proc_status_kib("VmHWM")  # since the last reset: the timed steps only
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak_split = peak_reset and hwm_kib is not None
    peak_kib = max(hwm_kib, warmup_hwm_kib or 0) if peak_split else maxrss_kib
    return {
        "config": cfg.name,
        "label": cfg.label,
        "ok": True,
        "peak_rss_gib": _gib(peak_kib),
        "peak_rss_source": "VmHWM reset after setup" if peak_split else "ru_maxrss",
        # getrusage's ru_maxrss reads the same high-water mark, so after a reset it misses construction.
        "ru_maxrss_gib": _gib(maxrss_kib),
        "process_peak_rss_gib": _gib(max(peak_kib, build_hwm_kib or 0)) if peak_split else _gib(maxrss_kib),
        "peak_rss_warmup_gib": _gib(warmup_hwm_kib),
        "peak_rss_timed_gib": _gib(hwm_kib) if peak_split else None,
        "rss_ready_gib": _gib(rss_ready_kib),
        "build_peak_rss_gib": _gib(build_hwm_kib),
        "build_s": build_s,
        "s_per_step_median": statistics.median(timed) if timed else None,
        "s_per_step_mean": statistics.fmean(timed) if timed else None,
        "step_times_s": times,
        # Split of each step: forward (loss) and the rest (backward + update, fused or not).
        "forward_times_s": forward_times,
        "backward_update_times_s": [t - f for t, f in zip(times, forward_times)],
        # CPU time of all threads: less sensitive than wall time to other processes on the machine
        # (a second opinion on a noisy machine), but it counts OpenMP spin-waiting as work.
        "cpu_s_per_step_median": statistics.median(cpu_timed) if cpu_timed else None,
        "step_cpu_times_s": cpu_times,
        "warmup": params["warmup"],
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "parameters": count_parameters(model),
        "weight_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "autocast": "bf16" if mixed else None,
        "grad_checkpointing": bool(params.get("grad_checkpointing")),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "notes": notes,
    }


# --------------------------------------------------------------------------------------- parent
def as_row(config: str, run: dict[str, Any]) -> dict[str, Any]:
    """A run from :func:`benchlib.run_one` as a result row: a failure (``{"error", "detail"}``)
    gets the configuration's name and label and ``ok: False``."""
    if "error" not in run:
        return run
    return {"config": config, "label": CONFIGS[config].label, "ok": False, **run}


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of one configuration (the first failure wins: it is what to report)."""
    failed = [r for r in runs if not r["ok"]]
    if failed:
        return failed[0]
    out = dict(runs[-1])
    for key in (
        "peak_rss_gib",
        "ru_maxrss_gib",
        "process_peak_rss_gib",
        "s_per_step_median",
        "s_per_step_mean",
        "cpu_s_per_step_median",
    ):
        out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = [{k: r[k] for k in ("peak_rss_gib", "s_per_step_median")} for r in runs]
    return out


def _add_ratios(results: dict[str, dict[str, Any]]) -> None:
    floor = results.get("floor") if results.get("floor", {}).get("ok") else None
    adamw = results.get("adamw") if results.get("adamw", {}).get("ok") else None
    for r in results.values():
        if not r["ok"]:
            continue
        for ref_name, ref in (("floor", floor), ("adamw", adamw)):
            r[f"memory_vs_{ref_name}"] = ratio(r["peak_rss_gib"], ref and ref["peak_rss_gib"])
            r[f"time_vs_{ref_name}"] = ratio(r["s_per_step_median"], ref and ref["s_per_step_median"])
            r[f"cpu_time_vs_{ref_name}"] = ratio(
                r["cpu_s_per_step_median"], ref and ref["cpu_s_per_step_median"]
            )


def _targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's acceptance targets for leantune AdaLomo, as booleans (None: not measurable)."""
    ada = results.get("adalomo", {})
    peer = results.get("lomo_optim_adalomo", {})
    adamw = results.get("adamw", {})

    def check(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    def faster(other: dict[str, Any]) -> bool | None:
        if not (ada.get("ok") and other.get("ok")):
            return None
        return ada["s_per_step_median"] < other["s_per_step_median"]

    return {
        "adalomo_memory_vs_floor": ada.get("memory_vs_floor"),
        "adalomo_memory_target": TARGETS["memory_vs_floor"],
        "adalomo_memory_met": check(ada.get("memory_vs_floor"), TARGETS["memory_vs_floor"]),
        "adalomo_time_vs_floor": ada.get("time_vs_floor"),
        "adalomo_time_target": TARGETS["time_vs_floor"],
        "adalomo_time_met": check(ada.get("time_vs_floor"), TARGETS["time_vs_floor"]),
        "adalomo_faster_than_adamw": faster(adamw),
        "adalomo_faster_than_lomo_optim_adalomo": faster(peer),
        "adalomo_time_vs_lomo_optim_adalomo": ratio(
            ada.get("s_per_step_median"), peer.get("s_per_step_median") if peer.get("ok") else None
        ),
    }


TABLE_HEAD = [
    "optimizer",
    "peak RSS GiB",
    "s/step",
    "mem ×floor",
    "time ×floor",
    "CPU ×floor",
    "mem ×AdamW",
    "time ×AdamW",
    "loss",
]


def _rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results.values():
        if not r["ok"]:
            rows.append([r["label"], "failed", r["error"][:80], *[""] * (len(TABLE_HEAD) - 3)])
            continue
        rows.append(
            [
                r["label"],
                fmt(r["peak_rss_gib"], ".2f"),
                fmt(r["s_per_step_median"], ".3g"),
                fmt(r.get("memory_vs_floor"), ".3f", "×"),
                fmt(r.get("time_vs_floor"), ".3f", "×"),
                fmt(r.get("cpu_time_vs_floor"), ".3f", "×"),
                fmt(r.get("memory_vs_adamw"), ".3f", "×"),
                fmt(r.get("time_vs_adamw"), ".3f", "×"),
                fmt(r["final_loss"], ".4f"),
            ]
        )
    return rows


def format_text_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [TABLE_HEAD, *_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEAD))]
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_table(results: dict[str, dict[str, Any]]) -> str:
    align = ["---"] + ["---:"] * (len(TABLE_HEAD) - 1)
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _rows(results)]
    return "\n".join(lines)


def _yes_no(flag: bool | None) -> str:
    return {True: "**yes**", False: "**no**", None: "not measured"}[flag]


def dtype_text(dtype: str) -> str:
    return "bf16 mixed precision (fp32 master weights, bf16 autocast)" if dtype == "mixed" else dtype


def format_markdown(report: dict[str, Any]) -> str:
    from leantune.models import human_count

    setup, machine, results, targets = (
        report["setup"],
        report["machine"],
        report["results"],
        report["targets"],
    )
    ok = next((r for r in results.values() if r["ok"]), None)
    params = f"{human_count(ok['parameters'])} parameters, " if ok else ""
    lines = [
        "# Optimizer step: peak memory and time per step",
        "",
        f"LLaMA shape `{setup['preset']}` ({params}random init), {dtype_text(setup['dtype'])}, "
        f"seq {setup['seq']}, "
        f"batch {setup['batch']}, gradient checkpointing {'on' if setup['grad_checkpointing'] else 'off'}; "
        f"{setup['steps']} timed steps after {setup['warmup']} warmup, {setup['repeats']} repeat(s); "
        "each configuration in a fresh subprocess, all in the same run.",
        "",
        _md_table(results),
        "",
        "Peak RSS: largest resident set during warmup + timed steps (includes weights, optimizer state "
        "and the interpreter). s/step: median wall time of forward + backward + update. Ratios are to "
        "the same run's floor (forward + backward with every gradient dropped as it arrives, no update) "
        "and AdamW. CPU ×floor: the same ratio in process CPU time (all threads), a second opinion when "
        "the machine is shared.",
        "",
        "## Targets for leantune AdaLomo",
        "",
        f"- peak memory ≤ {targets['adalomo_memory_target']}× floor: "
        f"{_yes_no(targets['adalomo_memory_met'])} ({fmt(targets['adalomo_memory_vs_floor'], '.3f', '×')})",
        f"- time per step ≤ {targets['adalomo_time_target']}× floor: "
        f"{_yes_no(targets['adalomo_time_met'])} ({fmt(targets['adalomo_time_vs_floor'], '.3f', '×')})",
        f"- faster than AdamW: {_yes_no(targets['adalomo_faster_than_adamw'])} "
        f"({fmt(results.get('adalomo', {}).get('time_vs_adamw'), '.3f', '×')} AdamW's time)",
        f"- faster than lomo-optim AdaLomo: {_yes_no(targets['adalomo_faster_than_lomo_optim_adalomo'])} "
        f"({fmt(targets['adalomo_time_vs_lomo_optim_adalomo'], '.3f', '×')} its time)",
        "",
        "## Notes",
        "",
    ]
    for r in results.values():
        for note in r.get("notes", []):
            lines.append(f"- {r['label']}: {note}")
        if not r["ok"]:
            lines.append(f"- {r['label']} failed: `{r['error']}`")
    lines += [
        "- No configuration clips gradients; torch optimizers use their defaults (no forced "
        "`foreach`/`fused`). Hyperparameters: "
        + ", ".join(f"{c.name} {c.kwargs or 'defaults'}" for c in CONFIGS.values() if c.name in results),
        "",
        "## Machine and command",
        "",
        f"- CPU: {machine['cpu_model']} ({machine['cpu_count']} logical CPUs), "
        f"RAM {machine['ram_gib']:.1f} GiB; torch threads {setup['threads']}",
        f"- torch {machine['torch']}, transformers {machine['transformers']}, "
        f"lomo-optim {machine['lomo_optim']}, Python {machine['python']}",
        f"- load average before / after: {machine['loadavg_before']} / {machine['loadavg_after']}",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def _plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results.values() if r["ok"]]
    if not ok:
        return False
    colors = {"floor": "0.6", "torch": "tab:blue", "leantune": "tab:green", "lomo_optim": "tab:orange"}
    labels = [r["label"] for r in ok]
    color = [colors[CONFIGS[r["config"]].kind] for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(ok) + 1.8), sharey=True)
    floor = results.get("floor") if results.get("floor", {}).get("ok") else None
    for ax, key, xlabel, target in (
        (axes[0], "peak_rss_gib", "peak RSS (GiB)", TARGETS["memory_vs_floor"]),
        (axes[1], "s_per_step_median", "seconds per step (median)", TARGETS["time_vs_floor"]),
    ):
        values = [r[key] for r in ok]
        ax.barh(labels, values, color=color)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        if floor is not None:
            ax.axvline(floor[key], color="k", lw=0.8, ls="--", label="floor")
            ax.axvline(
                floor[key] * target, color="tab:red", lw=0.8, ls=":", label=f"AdaLomo target: {target}× floor"
            )
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8, frameon=False)
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(values) * 1.18)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine_info(threads: int) -> dict[str, Any]:
    try:
        import lomo_optim

        lomo_version = lomo_optim.__version__
    except ImportError:
        lomo_version = "not installed"
    m = benchlib.machine()
    return {
        "cpu_model": m["cpu_model"],
        "cpu_count": m["cpus"],
        "ram_gib": m["ram_gib"] or 0.0,
        "threads": threads,
        "torch": m["torch"],
        "transformers": m["transformers"],
        "lomo_optim": lomo_version,
        "python": m["python"],
        "platform": m["platform"],
        "loadavg_before": benchlib.loadavg(),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Peak RSS and seconds per step of optimizers vs the forward+backward floor.",
    )
    benchlib.add_run_options(ap, list(CONFIGS), steps=8, warmup=2, timeout=3600.0)
    ap.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="weight dtype; mixed: fp32 weights, forward under bf16 autocast (default: fp32)",
    )
    ap.add_argument(
        "--grad-checkpointing", action="store_true", help="activation checkpointing (non-reentrant)"
    )
    ap.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="path without extension; writes .json, .md, .png (default: benchmarks/results/optim_step)",
    )
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (parent) and return the report that was written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        benchlib.emit_result(run_worker(json.loads(args.worker)))  # an exception: traceback, exit 1
        raise SystemExit(0)
    benchlib.check_run_options(args)
    names = benchlib.parse_only(args.only, list(CONFIGS))
    machine = machine_info(args.threads)
    base = {
        "preset": args.preset,
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "grad_checkpointing": args.grad_checkpointing,
        "threads": args.threads,
    }
    runs = benchlib.run_matrix(
        Path(__file__),
        {n: {**base, "config": n} for n in names},
        repeats=args.repeats,
        timeout=args.timeout,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        env=benchlib.thread_env(args.threads),
    )
    results = {n: _aggregate([as_row(n, r) for r in rs]) for n, rs in runs.items()}
    _add_ratios(results)
    machine["loadavg_after"] = benchlib.loadavg()
    out = Path(args.out)
    report = {
        "benchmark": "optim_step",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/optim_step.py", *argv]),
        "setup": {**base, "repeats": args.repeats, "configs": names},
        "machine": machine,
        "results": results,
        "targets": _targets(results),
        "files": {"json": str(out.with_suffix(".json")), "markdown": str(out.with_suffix(".md"))},
    }
    title = (
        f"{args.preset} {args.dtype} seq {args.seq} batch {args.batch}"
        f"{' ckpt' if args.grad_checkpointing else ''}, {args.threads} threads — {machine['cpu_model']}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if _plot(results, out.with_suffix(".png"), title):
        report["files"]["png"] = str(out.with_suffix(".png"))
    benchlib.write_report(out, report, format_markdown(report))
    print(format_text_table(results))
    print(f"\nwrote {', '.join(report['files'].values())}")
    return report


if __name__ == "__main__":
    main()
