"""The "65B on 8x24GB" demo, here: a full-parameter AdaLomo step of an 8B model within 24 GiB, and the
largest model AdamW can train in the same memory.

The LOMO paper trains a 65B model on one machine with 8 RTX 3090 (24 GB each): ~8.1 B parameters
per 24 GB device. The per-device equivalent on this CPU machine is a Llama-3-8B-shaped model
(``8b`` preset: 8.03 B parameters, random init) in one 24 GiB box:

(a) **AdaLomo**: one full-parameter training step of ``8b`` (forward, backward with the update
    fused into it, every weight updated; bf16 weights, which ``build_model`` initialises directly
    in bf16 above 1B parameters; transformers' non-reentrant activation checkpointing; one random
    batch of seq 512 x batch 1; ``--steps 1 --warmup 0``), measured by ``optim_step.py``'s worker
    in a fresh subprocess: peak RSS during the step and over the whole process (including model
    construction), construction time, step time and the loss (a random-init model starts near
    ln(vocab)), next to ``leantune.estimate``'s prediction of the same configuration.
(b) **AdamW** (``torch.optim.AdamW``, same sequence, batch and checkpointing), once with fp32
    weights and once with bf16 mixed precision (fp32 master weights, gradients and moments, forward
    under bf16 autocast): walking the presets upward (``0.37b``, ``0.5b``, ``1b``, ``3b``, ``7b``,
    ``8b``), the estimator predicts each one; the largest predicted to fit in ``--budget`` (default
    22 GiB) is measured, the next size up is reported as "does not fit (predicted X GiB)". With
    ``--try-oom`` that next size is also run, expected to fail: its worker gets an address-space
    limit of ``--oom-limit`` GiB (default: the budget) so it fails on an allocation instead of
    pushing the machine into the kernel's OOM killer; the failure is recorded.

Every run (but a ``--try-oom`` one) is skipped when its prediction exceeds the budget, workers run with
``oom_score_adj=1000`` and ``MALLOC_MMAP_THRESHOLD_=65536`` (as in ``memory_by_size.py``), and a
worker that dies or times out (``--timeout``, default 3600 s per run) is recorded, not raised.

Outputs (``--out``, default ``benchmarks/results/scale_demo``): ``.json`` (everything, rewritten
after every run), ``.md`` and ``.png`` (peak RSS of each run, and the prediction of the sizes that
do not fit, against the budget and 24 GiB).

Run (from the repository root, venv active, nothing else using the memory; ~30-60 min on 2 cores,
most of it the 8B step)::

    python benchmarks/scale_demo.py
    python benchmarks/scale_demo.py --parts adamw --try-oom   # also run the AdamW size that does not fit
    python benchmarks/scale_demo.py --quick                   # tiny presets, seq 32: a smoke test
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import memory_by_size
import optim_step
from benchlib import fmt

HERE = Path(__file__).resolve().parent


GIB = 1024**3
DEFAULT_OUT = HERE / "results" / "scale_demo"
QUICK_OUT = HERE / "results" / "tmp" / "scale_demo_quick"
DEFAULT_PRESET, QUICK_PRESET = "8b", "tiny"
DEFAULT_LADDER, QUICK_LADDER = "0.37b,0.5b,1b,3b,7b,8b", "test,tiny"
DEFAULT_ADAMW_DTYPES = "fp32,mixed"
PARTS = ("adalomo", "adamw")
DEVICE_GIB = 24  # one RTX 3090
PAPER = "LOMO (Lv et al., 2023): 65B parameters on 8 x RTX 3090 24 GB, ~8.1 B per device"


# ------------------------------------------------------------------------------------------ worker
def _worker(payload: str) -> int:
    """``optim_step``'s worker, under an address-space limit when the parameters ask for one."""
    params = json.loads(payload)
    limit = params.pop("address_space_limit_gib", None)
    if limit is not None:
        import resource

        # Virtual memory, not RSS: the worker fails on an allocation (or aborts) instead of growing
        # until the kernel's OOM killer acts. Raises if the limit cannot be set: no unlimited run.
        n = int(limit * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (n, n))
    benchlib.emit_result(optim_step.run_worker(params))  # an exception: traceback, exit 1
    return 0


def _run(params: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """One run in a fresh ``python scale_demo.py --worker JSON`` process (a failure is returned)."""
    env = {**benchlib.thread_env(params["threads"]), **memory_by_size.WORKER_ENV}
    oom = memory_by_size.OOM_SCORE_ADJ
    res = benchlib.run_one(Path(__file__), params, timeout=timeout, env=env, oom_score_adj=oom)
    return optim_step.as_row(params["config"], res)


def _measure(
    params: dict[str, Any],
    prediction: dict[str, Any],
    budget: float,
    timeout: float,
    tag: str,
    *,
    force=False,
) -> dict[str, Any]:
    """Run ``params`` unless predicted above ``budget`` (``force``: run anyway); a progress line."""
    label = f"{tag}: {params['preset']} {params['dtype']}"
    rec: dict[str, Any] = {
        "params": params,
        "prediction": prediction,
        "predicted_peak_gib": prediction["estimate_gib"],
    }
    if prediction["budget_check_gib"] > budget and not force:
        msg = f"skipped: predicted {prediction['budget_check_gib']:.2f} GiB > budget {budget:g} GiB"
        print(f"{label}: {msg}", file=sys.stderr, flush=True)
        return {**rec, "ok": False, "status": "skipped", "error": msg}
    print(f"{label} ...", end=" ", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = _run(params, timeout)
    rec |= res | {"wall_s": time.perf_counter() - t0, "status": "ok" if res.get("ok") else "failed"}
    if res.get("ok"):
        rec["prediction_error"] = (prediction["estimate_gib"] - res["peak_rss_gib"]) / res["peak_rss_gib"]
        done = (
            f"{res['peak_rss_gib']:.2f} GiB (process {res['process_peak_rss_gib']:.2f}, predicted "
            f"{prediction['estimate_gib']:.2f}), build {res['build_s']:.0f} s, "
            f"step {res['s_per_step_median']:.1f} s, loss {res['final_loss']:.3f}"
        )
    else:
        done = f"FAILED: {res.get('error')}"
    print(f"{done} ({rec['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return rec


# --------------------------------------------------------------------------------------- the parts
def _base(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "grad_checkpointing": True,
    }


def run_adalomo(args: argparse.Namespace) -> dict[str, Any]:
    """Part (a): one full-parameter AdaLomo step of ``args.preset`` in bf16 with checkpointing."""
    params = {"config": "adalomo", "preset": args.preset, "dtype": "bf16", **_base(args)}
    pred = memory_by_size.predict(args.preset, "adalomo", "bf16", True, args.seq, args.batch)
    rec = _measure(params, pred, args.budget, args.timeout, "AdaLomo")
    rec["parameters"] = rec.get("parameters") or pred["parameters"]
    return rec


def adamw_ladder(presets: list[str], dtype: str, seq: int, batch: int, budget: float) -> dict[str, Any]:
    """The presets by size with AdamW's prediction each; the largest that fits and the next one up."""
    ladder = []
    for p in presets:
        pred = memory_by_size.predict(p, "adamw", dtype, True, seq, batch)
        ladder.append({"preset": p, "parameters": pred["parameters"], "prediction": pred})
    ladder.sort(key=lambda e: e["parameters"])
    fits = [i for i, e in enumerate(ladder) if e["prediction"]["budget_check_gib"] <= budget]
    largest = fits[-1] if fits else None
    # The next size up: after the largest that fits (the smallest when nothing fits), if any.
    nxt = 0 if largest is None else largest + 1
    nxt = nxt if nxt < len(ladder) else None
    for i, e in enumerate(ladder):
        e["fits"] = i in fits
        e["role"] = "largest fitting" if i == largest else ("next size up" if i == nxt else "")
    return {
        "ladder": ladder,
        "largest_fitting": ladder[largest]["preset"] if largest is not None else None,
        "next_size_up": ladder[nxt]["preset"] if nxt is not None else None,
    }


def run_adamw(args: argparse.Namespace, dtype: str, out: dict[str, Any], on_result) -> None:
    """Part (b) for one dtype: measure the largest preset of ``out`` (an :func:`adamw_ladder`)
    predicted to fit and, with ``--try-oom``, the next size up under an address-space limit.
    Fills ``out["run"]`` and ``out["try_oom"]``, calling ``on_result()`` after each run."""
    out["run"] = out["try_oom"] = None
    for e in out["ladder"]:
        if e["role"] == "largest fitting":
            params = {"config": "adamw", "preset": e["preset"], "dtype": dtype, **_base(args)}
            out["run"] = _measure(params, e["prediction"], args.budget, args.timeout, "AdamW")
            on_result()
        elif e["role"] == "next size up":
            pred = e["prediction"]["budget_check_gib"]
            e["status"] = f"does not fit (predicted {pred:.2f} GiB > budget {args.budget:g} GiB)"
            if args.try_oom:
                params = {
                    "config": "adamw",
                    "preset": e["preset"],
                    "dtype": dtype,
                    **_base(args),
                    "address_space_limit_gib": args.oom_limit,
                }
                rec = _measure(
                    params, e["prediction"], args.budget, args.timeout, "AdamW (--try-oom)", force=True
                )
                rec["expected_to_fail"] = True
                rec["outcome"] = "ran: fit after all" if rec.get("ok") else "died as expected"
                out["try_oom"] = rec
                on_result()


# ------------------------------------------------------------------------------------------ report
def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: what AdaLomo trained, the largest AdamW run per dtype, the size ratio."""
    ada = report.get("adalomo") or {}
    out: dict[str, Any] = {}
    if ada.get("ok"):
        out["adalomo"] = {
            "preset": ada["params"]["preset"],
            "parameters": ada["parameters"],
            "peak_rss_gib": ada["peak_rss_gib"],
            "process_peak_rss_gib": ada["process_peak_rss_gib"],
            "predicted_gib": ada["predicted_peak_gib"],
            "fits_device": ada["process_peak_rss_gib"] <= DEVICE_GIB,
        }
    for dtype, part in report.get("adamw", {}).items():
        run = part.get("run") or {}
        nxt = next((e for e in part["ladder"] if e["role"] == "next size up"), None)
        entry = {
            "largest_preset": run["params"]["preset"] if run.get("ok") else None,
            "largest_parameters": run.get("parameters") if run.get("ok") else None,
            "peak_rss_gib": run.get("peak_rss_gib") if run.get("ok") else None,
            "next_preset": nxt and nxt["preset"],
            "next_predicted_gib": nxt and nxt["prediction"]["budget_check_gib"],
            "try_oom_outcome": (part.get("try_oom") or {}).get("outcome"),
        }
        if "adalomo" in out and entry["largest_parameters"]:
            entry["adalomo_size_ratio"] = out["adalomo"]["parameters"] / entry["largest_parameters"]
        out[f"adamw_{dtype}"] = entry
    return out


def _adalomo_md(report: dict[str, Any]) -> list[str]:
    from leantune.models import PRESETS, human_count

    ada = report.get("adalomo")
    if ada is None:
        return ["Not run (`--parts`)."]
    p = ada["params"]
    lines = [
        "| preset | parameters | weights | activation ckpt | seq × batch | peak RSS GiB (step) "
        "| process peak GiB (incl. build) | predicted GiB (step) | build s | step s | loss |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    head = f"| `{p['preset']}` | {human_count(ada['parameters'])} | bf16 | on | {p['seq']} × {p['batch']} | "
    pred = fmt(ada["predicted_peak_gib"], ".2f")
    if ada.get("ok"):
        lines.append(
            head + f"{ada['peak_rss_gib']:.2f} | {ada['process_peak_rss_gib']:.2f} | {pred} | "
            f"{ada['build_s']:.0f} | {ada['s_per_step_median']:.1f} | {ada['final_loss']:.3f} |"
        )
    else:
        lines.append(head + f"{ada['status']} | | {pred} | | | |")
    vocab = PRESETS[p["preset"]].vocab_size
    lines += [
        "",
        f"One step (the first: `--warmup {p['warmup']} --steps {p['steps']}`) of forward, backward and the "
        "AdaLomo update fused into backward; every weight is updated. The loss of a random-init model "
        f"starts near ln(vocab) = {math.log(vocab):.2f}. Peak RSS (step): high-water mark from the end of "
        "model construction through the step; process peak: the whole process, construction included.",
    ]
    if not ada.get("ok"):
        lines += ["", f"**{ada['status']}**: `{ada.get('error')}`"]
    return lines


def _adamw_md(report: dict[str, Any]) -> list[str]:
    from leantune.models import human_count

    if not report.get("adamw"):
        return ["Not run (`--parts`)."]
    lines = [
        "| weights | preset | parameters | predicted GiB | status | peak RSS GiB (step) | process peak GiB "
        "| s/step |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for dtype, part in report["adamw"].items():
        for e in part["ladder"]:
            pred = e["prediction"]["budget_check_gib"]
            rec = None
            if e["role"] == "largest fitting":
                rec = part.get("run")
                status = "**measured**" if rec and rec.get("ok") else f"failed: {rec and rec.get('error')}"
            elif e["role"] == "next size up":
                status = f"**does not fit** (predicted {pred:.2f} GiB)"
                if part.get("try_oom"):
                    rec = part["try_oom"]
                    why = "" if rec.get("ok") else f": `{rec.get('error')}`"
                    status += f"; `--try-oom`: {rec['outcome']}{why}"
            else:
                status = "fits (a larger one fits)" if e["fits"] else "does not fit"
            ok = rec is not None and rec.get("ok")
            lines.append(
                f"| {optim_step.dtype_text(dtype)} | `{e['preset']}` | {human_count(e['parameters'])} | "
                f"{pred:.2f} | {status} | {fmt(rec['peak_rss_gib'] if ok else None, '.2f')} | "
                f"{fmt(rec['process_peak_rss_gib'] if ok else None, '.2f')} | "
                f"{fmt(rec['s_per_step_median'] if ok else None, '.1f')} |"
            )
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    from leantune.models import human_count

    setup, machine, summary = report["setup"], report["machine"], report.get("summary", {})
    lines = [
        f"# Scale demo: full-parameter training of `{setup['preset']}` within {DEVICE_GIB} GiB",
        "",
        f"{PAPER}. The per-device equivalent here: a Llama-3-8B-shaped model (random init) on one CPU "
        f"machine with {machine['ram_gib']:.1f} GiB of RAM; every run in a fresh subprocess, predicted "
        f"by `leantune.estimate` first and skipped above the {setup['budget_gib']:g} GiB budget.",
    ]
    if not report.get("complete", True):
        lines += ["", "**Incomplete: the run was interrupted or is still going.**"]
    lines += ["", "## Summary", ""]
    ada = summary.get("adalomo")
    if ada:
        lines.append(
            f"- AdaLomo trains all {human_count(ada['parameters'])} parameters of `{ada['preset']}` at "
            f"{ada['peak_rss_gib']:.2f} GiB peak RSS during the step ({ada['process_peak_rss_gib']:.2f} GiB "
            f"over the whole process; predicted {ada['predicted_gib']:.2f} GiB)"
            + (f": within {DEVICE_GIB} GiB." if ada["fits_device"] else f": **above {DEVICE_GIB} GiB**.")
        )
    for dtype in setup["adamw_dtypes"] if report.get("adamw") else []:
        s = summary.get(f"adamw_{dtype}", {})
        largest = (
            f"at most `{s['largest_preset']}` ({human_count(s['largest_parameters'])} parameters, "
            f"{s['peak_rss_gib']:.2f} GiB measured)"
            if s.get("largest_preset")
            else "no measured size"
        )
        nxt = (
            f"; `{s['next_preset']}` does not fit (predicted {s['next_predicted_gib']:.2f} GiB)"
            if s.get("next_preset")
            else "; no larger preset in the ladder"
        )
        ratio = (
            f" AdaLomo trains a {s['adalomo_size_ratio']:.1f}× larger model."
            if s.get("adalomo_size_ratio")
            else ""
        )
        lines.append(f"- AdamW, {optim_step.dtype_text(dtype)}: {largest}{nxt}.{ratio}")
    lines += ["", f"## (a) AdaLomo: one full-parameter step of `{setup['preset']}`", "", *_adalomo_md(report)]
    lines += [
        "",
        f"## (b) AdamW: the largest preset that fits in {setup['budget_gib']:g} GiB",
        "",
        *_adamw_md(report),
        "",
        "Predicted: the larger of `leantune.estimate`'s peak for the training step and the "
        "model-construction peak. AdamW runs use the same sequence, batch and activation checkpointing "
        "as AdaLomo; mixed = fp32 master weights, gradients and moments, forward under bf16 autocast."
        + (
            f" `--try-oom` runs had an address-space limit of {setup['oom_limit_gib']:g} GiB."
            if setup["try_oom"]
            else ""
        ),
    ]
    if report.get("files", {}).get("png"):
        lines += ["", f"![peak RSS against the budget]({Path(report['files']['png']).name})"]
    notes = {}
    for rec in [report.get("adalomo")] + [
        r for part in report.get("adamw", {}).values() for r in (part.get("run"), part.get("try_oom"))
    ]:
        for note in (rec or {}).get("notes", []):
            notes[note] = None
    lines += ["", "## Machine and command", ""]
    lines += [f"- note: {n}" for n in notes]
    lines += memory_by_size.machine_lines(report)
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bars: measured peak RSS of each run (hatched: the prediction of sizes that were not measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from leantune.models import human_count

    bars: list[tuple[str, float, bool, str]] = []  # label, GiB, measured, color
    ada = report.get("adalomo")
    if ada is not None:
        value = ada["process_peak_rss_gib"] if ada.get("ok") else ada["prediction"]["budget_check_gib"]
        name = f"AdaLomo bf16\n{ada['params']['preset']} ({human_count(ada['parameters'])})"
        bars.append((name, value, bool(ada.get("ok")), "tab:green"))
    for dtype, part in report.get("adamw", {}).items():
        for e in part["ladder"]:
            if not e["role"]:
                continue
            rec = part.get("run") if e["role"] == "largest fitting" else part.get("try_oom")
            ok = bool(rec and rec.get("ok"))
            value = rec["process_peak_rss_gib"] if ok else e["prediction"]["budget_check_gib"]
            name = f"AdamW {dtype}\n{e['preset']} ({human_count(e['parameters'])})"
            bars.append((name, value, ok, "tab:blue"))
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(1.5 * len(bars) + 2.5, 4.2))
    for i, (_label, value, measured, color) in enumerate(bars):
        ax.bar(
            i, value, color=color if measured else "white", edgecolor=color, hatch="" if measured else "//"
        )
        ax.text(
            i,
            value,
            f"{value:.1f}" + ("" if measured else "\npredicted"),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    budget = report["setup"]["budget_gib"]
    ax.axhline(budget, color="tab:red", ls=":", lw=1, label=f"budget {budget:g} GiB")
    ax.axhline(DEVICE_GIB, color="k", ls="--", lw=0.8, label=f"{DEVICE_GIB} GiB (one RTX 3090)")
    ax.set_ylabel("peak RSS, whole process (GiB)")
    ax.set_ylim(0, max(max(b[1] for b in bars), DEVICE_GIB) * 1.15)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(
        f"Full-parameter training within {DEVICE_GIB} GiB — {report['machine']['cpu_model']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path, *, png: bool = False) -> None:
    report["summary"] = summarize(report)
    report["files"] = {"json": str(out.with_suffix(".json")), "markdown": str(out.with_suffix(".md"))}
    if png and plot(report, out.with_suffix(".png")):
        report["files"]["png"] = str(out.with_suffix(".png"))
    benchlib.write_report(out, report, format_markdown(report))


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="One full-parameter AdaLomo step of an 8B model, and the largest model AdamW fits.",
    )
    ap.add_argument("--preset", default=None, help=f"AdaLomo model (default: {DEFAULT_PRESET})")
    ap.add_argument("--adamw-presets", default=None, help=f"AdamW size ladder (default: {DEFAULT_LADDER})")
    ap.add_argument(
        "--adamw-dtypes", default=DEFAULT_ADAMW_DTYPES, help="AdamW weight dtypes (default: %(default)s)"
    )
    ap.add_argument("--parts", default=",".join(PARTS), help="what to run (default: %(default)s)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: 512; --quick: 32)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps (default: 1)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 2; --quick: 1)")
    ap.add_argument(
        "--budget", type=float, default=22.0, help="skip runs predicted above this many GiB (default: 22)"
    )
    ap.add_argument("--try-oom", action="store_true", help="also run AdamW's next size up (expected to fail)")
    ap.add_argument(
        "--oom-limit",
        type=float,
        default=None,
        help="address-space limit in GiB of the --try-oom runs (default: --budget)",
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (default: 3600)")
    ap.add_argument(
        "--out",
        default=None,
        help="path without extension (default: benchmarks/results/scale_demo; "
        "--quick: benchmarks/results/tmp/scale_demo_quick)",
    )
    ap.add_argument(
        "--quick", action="store_true", help=f"smoke test: {QUICK_PRESET} / {QUICK_LADDER}, seq 32"
    )
    ap.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    return ap


def _names(text: str) -> list[str]:
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def _parse_args(argv: list[str]) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.worker is not None:
        return args
    args.preset = args.preset or (QUICK_PRESET if args.quick else DEFAULT_PRESET)
    args.adamw_presets = _names(args.adamw_presets or (QUICK_LADDER if args.quick else DEFAULT_LADDER))
    args.seq = args.seq if args.seq is not None else (32 if args.quick else 512)
    args.threads = args.threads if args.threads is not None else (1 if args.quick else 2)
    args.oom_limit = args.oom_limit if args.oom_limit is not None else args.budget
    args.out = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    args.parts = _names(args.parts)
    args.adamw_dtypes = _names(args.adamw_dtypes)
    try:
        memory_by_size.check_presets([args.preset, *args.adamw_presets])
    except ValueError as err:
        ap.error(str(err))
    for name, value, known in (
        ("--parts", args.parts, PARTS),
        ("--adamw-dtypes", args.adamw_dtypes, optim_step.DTYPES),
    ):
        bad = [v for v in value if v not in known]
        if bad or not value:
            ap.error(
                f"{name}: unknown {', '.join(map(repr, bad)) or 'empty list'}; choose from {', '.join(known)}"
            )
    if "adamw" in args.parts and not args.adamw_presets:
        ap.error("--adamw-presets: empty list")
    for name, low in (("seq", 1), ("batch", 1), ("steps", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) < low:
            ap.error(f"--{name} must be >= {low}")
    if min(args.budget, args.timeout, args.oom_limit) <= 0:
        ap.error("--budget, --timeout and --oom-limit must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo (parent) and return the report that was written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.worker is not None:
        raise SystemExit(_worker(args.worker))
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "scale_demo",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/scale_demo.py", *argv]),
        "paper": PAPER,
        "setup": {
            "preset": args.preset,
            "adamw_presets": args.adamw_presets,
            "adamw_dtypes": args.adamw_dtypes,
            "parts": args.parts,
            **_base(args),
            "budget_gib": args.budget,
            "try_oom": args.try_oom,
            "oom_limit_gib": args.oom_limit,
            "timeout_s": args.timeout,
            "worker_env": memory_by_size.WORKER_ENV,
            "oom_score_adj": memory_by_size.OOM_SCORE_ADJ,
        },
        "machine": optim_step.machine_info(args.threads),
        "adalomo": None,
        "adamw": {},
        "complete": False,
    }
    t_start = time.perf_counter()

    def save(png: bool = False) -> None:
        report["elapsed_s"] = time.perf_counter() - t_start
        write_report(report, out, png=png)

    try:
        if "adalomo" in args.parts:
            report["adalomo"] = run_adalomo(args)
            save()
        if "adamw" in args.parts:
            for dtype in args.adamw_dtypes:
                part = adamw_ladder(args.adamw_presets, dtype, args.seq, args.batch, args.budget)
                report["adamw"][dtype] = part
                run_adamw(args, dtype, part, save)
                save()
    except KeyboardInterrupt:
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    else:
        report["complete"] = True
    report["machine"]["loadavg_after"] = benchlib.loadavg()
    save(png=True)
    print(format_markdown(report))
    print(f"wrote {', '.join(report['files'].values())}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["complete"] else 130)
