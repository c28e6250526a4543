"""Peak memory (and time per step) against parameter count, per optimizer: CoLLiE's figure, here.

For every model size (``leantune.models`` presets, LLaMA shapes with random init; default ``0.1b``,
``0.37b``, ``1b``), every setting (weight dtype + activation checkpointing; default ``fp32``
without checkpointing and ``bf16`` with it) and every optimizer configuration of
``benchmarks/optim_step.py`` (default: floor, SGD, AdamW, Adafactor, leantune LOMO / AdaLomo /
AdamW-in-backward, lomo-optim AdaLomo), one training run of ``--warmup`` + ``--steps`` steps
(forward + backward + update on one fixed random batch, seq 512 x batch 1) in a *fresh subprocess*,
one after another. Each run reports, exactly as ``optim_step.py`` measures it (its worker is reused):

* ``peak_rss_gib``: the largest RSS during the steps (weights, gradients, optimizer state,
  activations and the interpreter); ``process_peak_rss_gib`` also covers model construction;
* ``s_per_step_median``: wall time of forward + backward + update;

and the parent adds the ratios to the floor of the same size and setting (forward + backward with
every gradient dropped as it arrives, no update: what no optimizer can beat) and, next to every
measurement, ``leantune.estimate``'s prediction of the same configuration.

Safety on a shared machine: before a run the parent predicts its peak (the larger of the
estimate's training-step peak and a model-construction peak; lomo-optim configurations, which the
estimate does not model, get leantune's prediction of the same algorithm plus full-size fp32 copies
of the largest tensor, the temporaries its update allocates) and skips it, reported as
``skipped: predicted X GiB > budget``, when that exceeds ``--budget`` (default 20 GiB). Workers run
with ``oom_score_adj=1000`` (if memory still runs out the kernel kills the benchmark, not a
neighbour) and ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc would otherwise keep freed tensors of up to
32 MiB in its heap and inflate RSS by ~10%; the estimate assumes the fixed threshold). A worker that
dies or times out is recorded as failed and the sweep goes on.

Outputs (``--out``, default ``benchmarks/results/memory_by_size``): ``.json`` (everything, written
after every run, so an interrupted sweep keeps what it measured; ``--resume`` reuses its successful
runs when seq/batch/steps/warmup/threads match), ``.md`` (one table per setting: peak RSS GiB,
ratio to the floor and s/step per size; then measured against predicted) and ``.png`` (peak RSS
against parameter count, one line per optimizer, one panel per setting).

Run (from the repository root, venv active; ~1.5-3 h on 2 cores, dominated by the 1b runs)::

    python benchmarks/memory_by_size.py
    python benchmarks/memory_by_size.py --resume          # continue an interrupted sweep
    python benchmarks/memory_by_size.py --presets 0.1b,0.37b --settings fp32,mixed --only floor,adamw,adalomo
    python benchmarks/memory_by_size.py --quick           # test/tiny presets, seq 32: a smoke test, ~3 min

Settings are ``DTYPE`` or ``DTYPE+ckpt`` with ``DTYPE`` one of ``fp32``, ``bf16`` or ``mixed`` (bf16
autocast over fp32 master weights, as in ``optim_step.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import optim_step
from benchlib import fmt, ratio

HERE = Path(__file__).resolve().parent
CONFIGS = optim_step.CONFIGS
WORKER = Path(optim_step.__file__)

GIB = 1024**3
DEFAULT_OUT = HERE / "results" / "memory_by_size"
QUICK_OUT = HERE / "results" / "tmp" / "memory_by_size_quick"
DEFAULT_PRESETS = "0.1b,0.37b,1b"
QUICK_PRESETS = "test,tiny"
DEFAULT_CONFIGS = (
    "floor",
    "sgd",
    "adamw",
    "adafactor",
    "lomo",
    "adalomo",
    "adamw_in_backward",
    "lomo_optim_adalomo",
)
DEFAULT_SETTINGS = "fp32,bf16+ckpt"
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
OOM_SCORE_ADJ = 1000
# The repeated settings of one sweep; --resume reuses results only when they match.
FINGERPRINT_KEYS = ("seq", "batch", "steps", "warmup", "threads")

# lomo-optim configurations are predicted as leantune's implementation of the same algorithm plus
# the full-size fp32 temporaries of its update (read from lomo_optim 0.1.1: Lomo casts the gradient
# and the weight to fp32; AdaLomo also builds fp32 ``grad**2`` and the factored second moment).
ESTIMATOR_NAMES = {"lomo_optim_lomo": "lomo", "lomo_optim_adalomo": "adalomo"}
PEER_FP32_COPIES = {"lomo_optim_lomo": 2, "lomo_optim_adalomo": 4}


@dataclass(frozen=True)
class Setting:
    """A weight dtype (``optim_step.DTYPES``) and whether activation checkpointing is on."""

    dtype: str
    grad_checkpointing: bool

    @property
    def name(self) -> str:
        return self.dtype + ("+ckpt" if self.grad_checkpointing else "")

    @property
    def label(self) -> str:
        dtype = optim_step.dtype_text(self.dtype)
        ckpt = "activation checkpointing" if self.grad_checkpointing else "no activation checkpointing"
        return f"{dtype}, {ckpt}"


def parse_setting(text: str) -> Setting:
    """``"fp32"``, ``"bf16+ckpt"``, ``"mixed+ckpt"`` ... to a :class:`Setting`.

    Raises:
        ValueError: unknown dtype or flag.
    """
    dtype, *flags = text.strip().lower().split("+")
    if dtype not in optim_step.DTYPES or flags not in ([], ["ckpt"]):
        raise ValueError(
            f"unknown setting {text!r}: use DTYPE or DTYPE+ckpt, DTYPE one of {', '.join(optim_step.DTYPES)}"
        )
    return Setting(dtype, bool(flags))


def check_presets(names: list[str]) -> None:
    """Raise ``ValueError`` (with the closest known name) unless every name is a preset."""
    from leantune.models import PRESETS

    for name in names:
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown preset {name!r}.{hint} Known: {', '.join(PRESETS)}")


# ------------------------------------------------------------------------------------ prediction
def predict(
    preset: str, config: str, dtype: str, grad_checkpointing: bool, seq: int, batch: int
) -> dict[str, Any]:
    """``leantune.estimate``'s prediction for one run, and the figure the budget is checked against.

    Returns (GiB unless named otherwise): ``estimate_gib`` (the estimate's peak of a training step,
    comparable with the measured ``peak_rss_gib``), ``moment`` and ``breakdown_gib`` (its split),
    ``peer_margin_gib`` (lomo-optim's extra temporaries, 0 for other configurations),
    ``build_gib`` (model construction: imports + the model in its initialisation dtype + one cast
    tensor), ``budget_check_gib`` (the largest of these: what ``--budget`` is compared with),
    ``estimator_optimizer`` and ``parameters``.
    """
    from leantune.estimate import CPU_IMPORT_OVERHEAD, ModelShape, TrainSetup, estimate_memory
    from leantune.models import LOW_PRECISION_INIT_PARAMS, approx_parameters

    shape = ModelShape.from_preset(preset)
    name = ESTIMATOR_NAMES.get(config, config)
    setup = TrainSetup(
        optimizer=name, seq_len=seq, batch_size=batch, dtype=dtype, grad_checkpointing=grad_checkpointing
    )
    est = estimate_memory(shape, setup)
    largest = max(math.prod(s) for _, s in shape.tensors())
    margin = PEER_FP32_COPIES.get(config, 0) * 4 * largest
    # build_model: fp32 init then a cast, except bf16 presets above 1B, initialised in bf16 directly.
    direct = dtype == "bf16" and approx_parameters(preset) > LOW_PRECISION_INIT_PARAMS
    build = CPU_IMPORT_OVERHEAD + shape.parameters * (2 if direct else 4)
    if dtype == "bf16" and not direct:
        build += 2 * largest
    parts = est.to_dict()
    return {
        "estimator_optimizer": name,
        "estimate_gib": est.total / GIB,
        "moment": est.moment,
        "breakdown_gib": {
            k: parts[k] / GIB
            for k in ("weights", "gradients", "optimizer_state", "activations", "logits", "temporaries")
        }
        | {"overhead": parts["overhead"] / GIB},
        "peer_margin_gib": margin / GIB,
        "build_gib": build / GIB,
        "budget_check_gib": max(est.total + margin, build) / GIB,
        "parameters": shape.parameters,
    }


# ------------------------------------------------------------------------------------------ runs
def _run(params: dict[str, Any], timeout: float | None, *, script: Path = WORKER) -> dict[str, Any]:
    """One configuration in a fresh ``optim_step.py`` worker process (a failure is returned)."""
    env = {**benchlib.thread_env(params["threads"]), **WORKER_ENV}
    res = benchlib.run_one(script, params, timeout=timeout, env=env, oom_score_adj=OOM_SCORE_ADJ)
    return optim_step.as_row(params["config"], res)


def _record(res: dict[str, Any], preset: str, setting: Setting, prediction: dict[str, Any]) -> dict[str, Any]:
    status = "ok" if res.get("ok") else ("skipped" if res.get("skipped") else "failed")
    rec = {
        **res,
        "status": status,
        "preset": preset,
        "setting": setting.name,
        "dtype": setting.dtype,
        "grad_checkpointing": setting.grad_checkpointing,
        "prediction": prediction,
        "predicted_peak_gib": prediction["estimate_gib"],
    }
    if status == "ok":
        rec["prediction_error"] = ratio(prediction["estimate_gib"] - rec["peak_rss_gib"], rec["peak_rss_gib"])
    return rec


def add_ratios(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """``memory_vs_floor`` / ``time_vs_floor`` of every successful run (None without a floor)."""
    for by_preset in results.values():
        for runs in by_preset.values():
            floor = runs.get("floor") if runs.get("floor", {}).get("ok") else None
            for r in runs.values():
                if r.get("ok"):
                    r["memory_vs_floor"] = ratio(r["peak_rss_gib"], floor and floor["peak_rss_gib"])
                    r["time_vs_floor"] = ratio(r["s_per_step_median"], floor and floor["s_per_step_median"])


def _progress(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        return (
            f"{r['peak_rss_gib']:.2f} GiB (predicted {r['predicted_peak_gib']:.2f}), "
            f"{r['s_per_step_median']:.3g} s/step"
        )
    return r["error"] if r["status"] == "skipped" else f"FAILED: {r['error']}"


# ---------------------------------------------------------------------------------------- report
def _cell_status(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if r["status"] == "skipped":
        return f"skipped (pred. {r['prediction']['budget_check_gib']:.1f})"
    return "failed"


def _setting_tables(report: dict[str, Any], setting: str) -> list[str]:
    from leantune.models import human_count

    presets, configs = report["setup"]["presets"], report["setup"]["configs"]
    runs = report["results"].get(setting, {})
    params = report["presets"]
    head = ["optimizer"]
    for p in presets:
        head += [f"{p} ({human_count(params[p]['parameters'])}) GiB", "×floor", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    check = ["optimizer", *[f"{p}: measured / predicted GiB" for p in presets]]
    check_lines = ["| " + " | ".join(check) + " |", "| --- |" + " ---: |" * len(presets)]
    for name in configs:
        row, crow = [CONFIGS[name].label], [CONFIGS[name].label]
        for p in presets:
            r = runs.get(p, {}).get(name)
            if r is not None and r["status"] == "ok":
                row += [
                    fmt(r["peak_rss_gib"], ".2f"),
                    fmt(r.get("memory_vs_floor"), ".2f", "×"),
                    fmt(r["s_per_step_median"], ".3g"),
                ]
                err = r.get("prediction_error")
                err_text = fmt(None if err is None else err * 100, "+.1f", "%")
                crow.append(f"{r['peak_rss_gib']:.2f} / {r['predicted_peak_gib']:.2f} ({err_text})")
            else:
                row += [_cell_status(r), "", ""]
                crow.append(_cell_status(r) if r is None or r["status"] != "skipped" else "skipped")
        lines.append("| " + " | ".join(row) + " |")
        check_lines.append("| " + " | ".join(crow) + " |")
    return lines + [
        "",
        "Measured against `leantune.estimate` (error: (predicted − measured) / measured):",
        "",
        *check_lines,
    ]


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one section per setting, then notes, machine and command."""
    from leantune.models import human_count

    setup = report["setup"]
    sizes = ", ".join(f"`{p}` ({human_count(report['presets'][p]['parameters'])})" for p in setup["presets"])
    lines = [
        "# Peak memory against model size, per optimizer",
        "",
        f"LLaMA shapes with random init: {sizes}; seq {setup['seq']}, batch {setup['batch']}; "
        f"{setup['steps']} timed step(s) after {setup['warmup']} warmup; torch threads {setup['threads']}. "
        "Each run in a fresh subprocess, one after another (glibc mmap threshold fixed at 64 KiB so that "
        "RSS follows live memory). Runs predicted above the "
        f"{setup['budget_gib']:g} GiB budget are skipped.",
        "",
        "Peak RSS: the largest resident set during the steps (weights, gradients, optimizer state, "
        "activations and the interpreter). ×floor: ratio to the floor of the same size and setting "
        "(forward + backward with every gradient dropped as it arrives, no update). s/step: median wall "
        "time of forward + backward + update.",
    ]
    if not report.get("complete", True):
        lines += ["", "**Incomplete: the sweep was interrupted or is still running.**"]
    for s in setup["settings"]:
        lines += ["", f"## {s['label']} (`{s['name']}`)", "", *_setting_tables(report, s["name"])]
    if report.get("files", {}).get("png"):
        lines += ["", f"![peak RSS against parameters]({Path(report['files']['png']).name})"]
    lines += ["", "## Notes", ""]
    notes: dict[str, None] = {}
    for setting, by_preset in report["results"].items():
        for preset, runs in by_preset.items():
            for r in runs.values():
                where = f"{preset} `{setting}` {r['label']}"
                if r["status"] == "failed":
                    notes[f"{where} failed: `{r['error']}`"] = None
                elif r["status"] == "skipped":
                    notes[f"{where}: {r['error']}"] = None
                for note in r.get("notes", []):
                    notes[f"{r['label']}: {note}"] = None
    lines += [f"- {n}" for n in notes]
    lines += [
        "- Predictions: `leantune.estimate` for the same configuration (lomo-optim runs: leantune's "
        "implementation of the same algorithm, the budget check adds its full-size fp32 update "
        "temporaries). The budget is checked against the larger of that and the model-construction "
        "peak.",
        "- Hyperparameters: "
        + ", ".join(f"{n} {CONFIGS[n].kwargs or 'defaults'}" for n in setup["configs"])
        + "; no gradient clipping.",
        "",
        "## Machine and command",
        "",
        *machine_lines(report),
    ]
    return "\n".join(lines)


def machine_lines(report: dict[str, Any]) -> list[str]:
    """The "Machine and command" bullet points of a report (shared with ``scale_demo.py``)."""
    machine = report["machine"]
    return [
        f"- CPU: {machine['cpu_model']} ({machine['cpu_count']} logical CPUs), "
        f"RAM {machine['ram_gib']:.1f} GiB; torch threads {report['setup']['threads']}",
        f"- torch {machine['torch']}, transformers {machine['transformers']}, "
        f"lomo-optim {machine['lomo_optim']}, Python {machine['python']}",
        f"- load average before / after: {machine['loadavg_before']} / {machine.get('loadavg_after')}",
        f"- date: {report['date']}; wall time {report.get('elapsed_s', 0) / 60:.1f} min",
        f"- command: `{report['command']}`",
        "",
    ]


def plot(report: dict[str, Any], path: Path) -> bool:
    """Peak RSS against parameter count: one line per optimizer, one panel per setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from leantune.models import human_count

    setup = report["setup"]
    settings = setup["settings"]
    if not any(r.get("ok") for s in report["results"].values() for runs in s.values() for r in runs.values()):
        return False
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.6), sharey=True, squeeze=False)
    counts = [report["presets"][p]["parameters"] for p in setup["presets"]]
    markers = "os^vD<>px*h"
    for ax, s in zip(axes[0], settings):
        runs = report["results"].get(s["name"], {})
        for k, name in enumerate(setup["configs"]):
            pts = sorted(
                (report["presets"][p]["parameters"], r["peak_rss_gib"])
                for p in setup["presets"]
                if (r := runs.get(p, {}).get(name)) is not None and r.get("ok")
            )
            if not pts:
                continue
            style = {"color": "k", "ls": "--"} if name == "floor" else {"color": f"C{k % 10}"}
            ax.plot(*zip(*pts), marker=markers[k % len(markers)], label=CONFIGS[name].label, **style)
        ax.axhline(setup["budget_gib"], color="tab:red", lw=0.8, ls=":", label="budget")
        if len(counts) > 1 and max(counts) / min(counts) > 4:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(counts, [f"{p}\n{human_count(n)}" for p, n in zip(setup["presets"], counts)])
        ax.set_xlabel("parameters (preset)")
        ax.set_title(s["label"], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("peak RSS (GiB)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(
        f"Peak RSS of a training step against model size (seq {setup['seq']}, batch {setup['batch']}) "
        f"— {report['machine']['cpu_model']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path, *, png: bool = False) -> None:
    """Write ``<out>.json`` and ``<out>.md`` (and, with ``png``, ``<out>.png``)."""
    report["files"] = {"json": str(out.with_suffix(".json")), "markdown": str(out.with_suffix(".md"))}
    if png and plot(report, out.with_suffix(".png")):
        report["files"]["png"] = str(out.with_suffix(".png"))
    benchlib.write_report(out, report, format_markdown(report))


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Peak RSS and s/step against parameter count, per optimizer (fresh process per run).",
    )
    ap.add_argument("--presets", default=None, help=f"comma-separated presets (default: {DEFAULT_PRESETS})")
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT_CONFIGS),
        help=f"optimizer configurations, of: {', '.join(CONFIGS)} (default: %(default)s)",
    )
    ap.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help="comma-separated DTYPE or DTYPE+ckpt, DTYPE in fp32/bf16/mixed (default: %(default)s)",
    )
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: 512; --quick: 32)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per run (default: 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 2; --quick: 1)")
    ap.add_argument(
        "--budget", type=float, default=20.0, help="skip runs predicted above this many GiB (default: 20)"
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (default: 3600)")
    ap.add_argument(
        "--out",
        default=None,
        help="path without extension: .json/.md/.png (default: benchmarks/results/memory_by_size; "
        "--quick: benchmarks/results/tmp/memory_by_size_quick)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the successful runs of an existing <out>.json (same seq/batch/steps/warmup/threads); "
        "it is then rewritten with this sweep's runs only",
    )
    ap.add_argument(
        "--quick", action="store_true", help=f"smoke test: presets {QUICK_PRESETS}, seq 32, 1 thread"
    )
    return ap


def _load_previous(path: Path, fingerprint: dict[str, Any], ap: argparse.ArgumentParser) -> dict[str, Any]:
    """The successful runs of a previous sweep with the same fingerprint, keyed like ``results``."""
    if not path.is_file():
        print(f"--resume: no {path} yet, starting afresh", file=sys.stderr)
        return {}
    try:
        old = json.loads(path.read_text())
        old_fp = {k: old["setup"][k] for k in FINGERPRINT_KEYS}
        results = old["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        ap.error(f"--resume: cannot read {path}: {err}")
    if old_fp != fingerprint:
        diff = ", ".join(
            f"{k} {old_fp[k]} (now {fingerprint[k]})" for k in FINGERPRINT_KEYS if old_fp[k] != fingerprint[k]
        )
        ap.error(f"--resume: {path} was measured with different settings: {diff}; use another --out")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep (parent) and return the report that was written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    presets_arg = args.presets or (QUICK_PRESETS if args.quick else DEFAULT_PRESETS)
    seq = args.seq if args.seq is not None else (32 if args.quick else 512)
    threads = args.threads if args.threads is not None else (1 if args.quick else 2)
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    for name, value, low in (
        ("seq", seq, 1),
        ("batch", args.batch, 1),
        ("steps", args.steps, 1),
        ("warmup", args.warmup, 0),
        ("threads", threads, 1),
    ):
        if value < low:
            ap.error(f"--{name} must be >= {low}")
    if args.budget <= 0 or args.timeout <= 0:
        ap.error("--budget and --timeout must be > 0")
    presets = [p.strip() for p in presets_arg.split(",") if p.strip()]
    try:
        check_presets(presets)
        settings = [parse_setting(s) for s in args.settings.split(",") if s.strip()]
    except ValueError as err:
        ap.error(str(err))
    try:
        configs = benchlib.parse_only(args.only, list(CONFIGS))
    except SystemExit as err:  # its message names the unknown configuration and the closest one
        ap.error(str(err.code))
    if not (presets and settings and configs):
        ap.error("--presets, --settings and --only need at least one name each")
    presets = list(dict.fromkeys(presets))
    settings = list(dict.fromkeys(settings))
    fingerprint = {
        "seq": seq,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": threads,
    }
    previous = _load_previous(out.with_suffix(".json"), fingerprint, ap) if args.resume else {}

    predictions = {
        (s.name, p, c): predict(p, c, s.dtype, s.grad_checkpointing, seq, args.batch)
        for s in settings
        for p in presets
        for c in configs
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "memory_by_size",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/memory_by_size.py", *argv]),
        "setup": {
            **fingerprint,
            "presets": presets,
            "settings": [
                {
                    "name": s.name,
                    "label": s.label,
                    "dtype": s.dtype,
                    "grad_checkpointing": s.grad_checkpointing,
                }
                for s in settings
            ],
            "configs": configs,
            "budget_gib": args.budget,
            "timeout_s": args.timeout,
            "worker_env": WORKER_ENV,
            "oom_score_adj": OOM_SCORE_ADJ,
        },
        "machine": optim_step.machine_info(threads),
        "presets": {
            p: {"parameters": predictions[(settings[0].name, p, configs[0])]["parameters"]} for p in presets
        },
        "results": {s.name: {p: {} for p in presets} for s in settings},
        "complete": False,
    }
    results = report["results"]
    plan = [(s, p, c) for s in settings for p in presets for c in configs]
    t_start = time.perf_counter()
    try:
        for k, (s, p, c) in enumerate(plan, 1):
            prefix = f"[{k}/{len(plan)}] {p} {s.name} {c}"
            pred = predictions[(s.name, p, c)]
            old = previous.get(s.name, {}).get(p, {}).get(c)
            if old is not None and old.get("ok"):
                rec = _record({**old, "reused": True}, p, s, pred)
                print(f"{prefix}: reused: {_progress(rec)}", file=sys.stderr, flush=True)
            elif pred["budget_check_gib"] > args.budget:
                msg = f"skipped: predicted {pred['budget_check_gib']:.2f} GiB > budget {args.budget:g} GiB"
                res = {"config": c, "label": CONFIGS[c].label, "ok": False, "skipped": True, "error": msg}
                rec = _record(res, p, s, pred)
                print(f"{prefix}: {msg}", file=sys.stderr, flush=True)
            else:
                print(f"{prefix} ...", end=" ", file=sys.stderr, flush=True)
                params = {
                    "config": c,
                    "preset": p,
                    "dtype": s.dtype,
                    "grad_checkpointing": s.grad_checkpointing,
                    **fingerprint,
                }
                t0 = time.perf_counter()
                res = _run(params, args.timeout)
                rec = _record({**res, "wall_s": time.perf_counter() - t0}, p, s, pred)
                total = (time.perf_counter() - t_start) / 60
                print(
                    f"{_progress(rec)} ({rec['wall_s']:.0f} s; {total:.1f} min so far)",
                    file=sys.stderr,
                    flush=True,
                )
            results[s.name][p][c] = rec
            add_ratios(results)
            report["elapsed_s"] = time.perf_counter() - t_start
            write_report(report, out)
    except KeyboardInterrupt:
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    else:
        report["complete"] = True
    report["machine"]["loadavg_after"] = benchlib.loadavg()
    report["elapsed_s"] = time.perf_counter() - t_start
    write_report(report, out, png=True)
    for s in settings:
        print(f"\n{s.label} ({s.name})\n")
        print("\n".join(_setting_tables(report, s.name)))
    print(f"\nwrote {', '.join(report['files'].values())}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["complete"] else 130)
