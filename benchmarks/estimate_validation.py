"""Validate ``leantune estimate`` against measured peak memory.

Each configuration runs in a *fresh subprocess* (``python benchmarks/estimate_validation.py --worker
JSON``) that builds a preset model (random init), runs a few real training steps with the real
leantune optimizers (fused ones through ``opt.backward(loss)``, ordinary ones through
``leantune.optim.as_stepper``), and reports its peak resident memory. The parent compares each with
:func:`leantune.estimate.estimate_memory` and writes ``<out>.md``, ``<out>.json`` and ``<out>.png``
(default ``benchmarks/results/estimate_validation``): relative error per configuration, max and
mean absolute error. The target is every configuration within 10%.

How peak memory is measured: after imports the worker records RSS (the framework baseline); after
the model, optimizer and batch are built it returns freed heap to the OS (``malloc_trim``) and
resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), so the peak covers the
training steps only (model construction casts fp32 weights to bf16 and would otherwise dominate).
The peak is ``VmHWM`` from ``/proc/self/status`` over all steps (step 1 allocates the optimizer
state, step 2 runs with it). The high-water mark before the reset (imports + construction) is
recorded as ``build_peak_rss``; ``ru_maxrss`` is the fallback when the reset is not permitted.

Allocator: workers run with ``MALLOC_MMAP_THRESHOLD_=65536``. glibc's default threshold adapts
upwards to the largest freed block (up to 32 MiB), after which tensors of up to 32 MiB are carved
from the heap and their memory is kept after they are freed; RSS then exceeds live tensor memory by
a configuration-dependent 10-30% that grows over the first steps. A fixed threshold makes RSS track
live memory, which is what the estimate models. ``--default-malloc NAMES`` measures some
configurations a second time with glibc's defaults to show that difference.

Run (from the repository root, venv active)::

    python benchmarks/estimate_validation.py                 # all configurations (~10 min, 2 threads)
    python benchmarks/estimate_validation.py --only 0.1b-fp32-lomo,0.1b-bf16-adalomo
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import benchlib
from leantune.rss import proc_status_bytes, release_free_memory, reset_peak_rss

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "estimate_validation"
MiB, GiB = 1 << 20, 1 << 30
TARGET = 0.10
FIXED_MMAP_THRESHOLD = "65536"


@dataclass(frozen=True)
class Config:
    """One measured configuration."""

    preset: str
    optim: str
    dtype: str
    seq: int = 512
    batch: int = 1
    ckpt: bool = False
    accum: int = 1
    kv_heads: int | None = None  # override the preset's key/value heads (grouped-query attention)
    tied: bool | None = None  # override the preset's tie_word_embeddings
    vocab: int | None = None  # override the vocabulary size (small: activations dominate the loss)
    padded: bool = False  # the last quarter of the last sequence is padding (attention mask zeros)
    loss_chunk: int = 0  # leantune's chunked loss (train.loss_chunk); 0 = model(**batch).loss

    @property
    def name(self) -> str:
        parts = [self.preset, self.dtype, self.optim]
        if self.kv_heads is not None:
            parts.append(f"gqa{self.kv_heads}")
        if self.tied is not None:
            parts.append("tied" if self.tied else "untied")
        if self.vocab is not None:
            parts.append(f"v{self.vocab}")
        if self.padded:
            parts.append("padded")
        if self.ckpt:
            parts.append("ckpt")
        if self.loss_chunk:
            parts.append(f"chunk{self.loss_chunk}")
        if self.accum > 1:
            parts.append(f"accum{self.accum}")
        if (self.seq, self.batch) != (512, 1):
            parts.append(f"s{self.seq}b{self.batch}")
        return "-".join(parts)


CONFIGS: tuple[Config, ...] = (
    # One of each optimizer family at the optimizer benchmark's length.
    Config("0.1b", "floor", "fp32"),
    Config("0.1b", "lomo", "fp32"),
    Config("0.1b", "adamw", "fp32"),
    Config("0.1b", "adamw_in_backward", "fp32"),
    Config("0.1b", "adalomo", "bf16"),
    Config("0.1b", "adamw", "bf16"),
    Config("0.1b", "adamw_in_backward", "bf16"),
    Config("0.1b", "lion", "bf16", seq=256, batch=2),
    Config("0.1b", "adafactor", "bf16", seq=256, batch=2),
    Config("0.1b", "sgd", "fp32", seq=256, batch=2),
    # Checkpointing, accumulation, autocast, grouped-query attention with tied embeddings.
    Config("0.1b", "adalomo", "fp32", ckpt=True),
    Config("0.1b", "lomo", "bf16", ckpt=True),
    Config("0.1b", "adalomo", "fp32", accum=2),
    Config("0.1b", "adamw", "mixed"),
    Config("0.1b", "adalomo", "mixed"),
    Config("0.1b", "adalomo", "bf16", kv_heads=4, tied=True),
    # A small vocabulary moves the peak from the loss to the last layer's backward.
    Config("0.1b", "adalomo", "bf16", vocab=1024, seq=1024),
    Config("0.1b", "lomo", "fp32", ckpt=True, vocab=1024, seq=1024),
    # Padding: an L x L mask per layer and k/v repeated to all heads.
    Config("0.1b", "adalomo", "bf16", kv_heads=4, vocab=1024, seq=2048, padded=True),
    # The 0.37b preset.
    Config("0.37b", "adalomo", "bf16"),
    Config("0.37b", "lomo", "bf16", ckpt=True, seq=1024),
    Config("0.37b", "lomo", "fp32"),
)
DEFAULT_MALLOC = ("0.1b-fp32-lomo", "0.1b-bf16-adamw")


# ------------------------------------------------------------------------------------------ worker
def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build, train ``steps`` steps, report memory (runs in its own process)."""
    import resource

    import torch

    if cfg.get("mallopt"):  # what `leantune train` does at start-up, instead of the environment variable
        from leantune.rss import fix_mmap_threshold

        fix_mmap_threshold()
    torch.set_num_threads(int(cfg["threads"]))
    import transformers  # noqa: F401  (part of the baseline the estimate's overhead constant covers)
    from transformers import LlamaForCausalLM  # noqa: F401

    from leantune.models import build_model, resolve_dtype
    from leantune.optim import as_stepper, build_optimizer, is_fused

    baseline = proc_status_bytes("VmRSS")
    mixed = cfg["dtype"] == "mixed"
    dtype = resolve_dtype("fp32" if mixed else cfg["dtype"])
    overrides = {}
    if cfg.get("kv_heads") is not None:
        overrides["num_key_value_heads"] = cfg["kv_heads"]
    if cfg.get("tied") is not None:
        overrides["tie_word_embeddings"] = cfg["tied"]
    if cfg.get("hf_config"):  # a family's config.json (benchmarks/estimate_families.py)
        from transformers import AutoConfig, AutoModelForCausalLM

        from leantune.models import resolve_attention

        fields = dict(cfg["hf_config"])
        hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            hf, attn_implementation=resolve_attention(hf, "auto"), dtype=dtype
        )
    else:
        model = build_model(
            preset=cfg["preset"],
            dtype=dtype,
            vocab_size=cfg.get("vocab"),
            attn_implementation="sdpa",
            config_overrides=overrides,
        )
    model.config.use_cache = False
    model.train()
    if cfg["ckpt"]:
        model.activation_checkpointing_enable()
    name, k = cfg["optim"], int(cfg["accum"])
    if name == "floor":
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

        class _Floor:
            def backward(self, loss: torch.Tensor) -> None:
                loss.backward()

        opt: Any = _Floor()
    elif is_fused(name):
        opt = build_optimizer(name, model, lr=1e-4, accumulation_steps=k)
    else:
        opt = as_stepper(build_optimizer(name, model, lr=1e-4), accumulation_steps=k)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (cfg["batch"], cfg["seq"]), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    if cfg.get("padded"):
        mask = torch.ones_like(ids)
        mask[-1, -(cfg["seq"] // 4) :] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    from leantune.loss import ChunkedLMLoss, StandardLMLoss

    loss_fn = ChunkedLMLoss(model, int(cfg["loss_chunk"])) if cfg.get("loss_chunk") else StandardLMLoss()
    release_free_memory()
    after_build = proc_status_bytes("VmRSS")
    build_peak = proc_status_bytes("VmHWM")  # imports + model construction (a preset initialises in fp32)
    reset_ok = reset_peak_rss()
    peaks, seconds, losses = [], [], []
    for _ in range(int(cfg["steps"])):
        t0 = time.perf_counter()
        if cfg.get("trim"):  # give freed heap back before every step (leantune.rss.release_free_memory)
            release_free_memory()
        for _ in range(k):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model, batch)  # the output object dies here
            opt.backward(loss)
            losses.append(loss.detach().item())
            del loss
        seconds.append(time.perf_counter() - t0)
        peaks.append(proc_status_bytes("VmHWM"))
        reset_peak_rss()
    inner = getattr(opt, "optimizer", opt)
    tensors = [t for st in getattr(inner, "state", {}).values() for t in st.values()]
    tensors += [t for bufs in getattr(inner, "_buffers", {}).values() for t in bufs]  # AdaLomo workspaces
    state = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    release_free_memory()
    after_steps = proc_status_bytes("VmRSS")
    return {
        "baseline_rss": baseline,
        "after_steps_rss": after_steps,
        "optimizer_state_bytes": state,
        # What the steps left resident beyond the optimizer state: scratch of oneDNN/OpenMP/autograd.
        "runtime_overhead": after_steps - after_build - state,
        "after_build_rss": after_build,
        # Without a resettable high-water mark, ru_maxrss (whole process, construction included).
        "peak_rss": max(peaks) if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_peaks": peaks,
        "build_peak_rss": build_peak,
        "peak_reset": reset_ok,
        "seconds": seconds,
        "losses": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": sum(1 for _ in model.parameters()),
    }


def measure_in_subprocess(
    payload: dict[str, Any],
    label: str,
    *,
    threads: int,
    mmap_threshold: str | None = FIXED_MMAP_THRESHOLD,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run :func:`run_worker` on ``payload`` in a fresh process (``env``, default this process's,
    with ``threads`` and glibc's ``MALLOC_MMAP_THRESHOLD_``: None keeps glibc's default) and return
    its result, read from its ``RESULT`` line (:func:`benchlib.run_worker`, which adds
    ``process_wall_seconds``). Raises :class:`benchlib.WorkerError`."""
    env = {k: v for k, v in (env or os.environ).items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env |= benchlib.thread_env(threads)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = mmap_threshold
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(payload)]
    return benchlib.run_worker(cmd, env, label)


def _run_subprocess(
    cfg: Config, *, threads: int, steps: int, default_malloc: bool, mallopt: bool = False
) -> dict[str, Any]:
    payload = {**asdict(cfg), "threads": threads, "steps": steps, "mallopt": mallopt}
    threshold = None if default_malloc or mallopt else FIXED_MMAP_THRESHOLD
    return measure_in_subprocess(payload, cfg.name, threads=threads, mmap_threshold=threshold)


# ------------------------------------------------------------------------------------------ parent
def predict(cfg: Config) -> dict[str, Any]:
    from leantune.estimate import ModelShape, TrainSetup, estimate_memory

    shape = ModelShape.from_preset(cfg.preset, vocab_size=cfg.vocab)
    if cfg.kv_heads is not None:
        shape = dataclasses.replace(shape, num_kv_heads=cfg.kv_heads)
    if cfg.tied is not None:
        shape = dataclasses.replace(shape, tie_word_embeddings=cfg.tied)
    setup = TrainSetup(
        optimizer=cfg.optim,
        seq_len=cfg.seq,
        batch_size=cfg.batch,
        dtype=cfg.dtype,
        grad_checkpointing=cfg.ckpt,
        accumulation_steps=cfg.accum,
        padded=cfg.padded,
        loss_chunk=cfg.loss_chunk,
    )
    return estimate_memory(shape, setup).to_dict()


def _row(name: str, pred: dict[str, Any], meas: dict[str, Any]) -> dict[str, Any]:
    err = (pred["total"] - meas["peak_rss"]) / meas["peak_rss"]
    return {
        "config": name,
        "predicted": pred["total"],
        "measured": meas["peak_rss"],
        "error": err,
        "moment": pred["moment"],
        "prediction": pred,
        "measurement": meas,
    }


def format_table(rows: list[dict[str, Any]], width: int = 44) -> list[str]:
    head = f"| {'config':<{width}} | predicted GiB | measured GiB |  error | peak moment (predicted) |"
    lines = [head, "|" + "|".join(["-" * (width + 2), "-" * 15, "-" * 14, "-" * 8, "-" * 25]) + "|"]
    for r in rows:
        lines.append(
            f"| {r['config']:<{width}} | {r['predicted'] / GiB:>13.3f} | {r['measured'] / GiB:>12.3f} | "
            f"{r['error'] * 100:>+5.1f}% | {r['moment']:<23} |"
        )
    return lines


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    errs = [abs(r["error"]) for r in rows]
    if not errs:
        return {}
    return {
        "max_abs_error": max(errs),
        "mean_abs_error": sum(errs) / len(errs),
        "within_target": sum(e <= TARGET for e in errs),
        "count": len(errs),
        "target": TARGET,
    }


def _breakdown_table(rows: list[dict[str, Any]]) -> list[str]:
    keys = ("weights", "gradients", "optimizer_state", "activations", "logits", "temporaries", "overhead")
    lines = [
        "| config | " + " | ".join(keys) + " |",
        "|" + "|".join(["---"] * (len(keys) + 1)) + "|",
    ]
    for r in rows:
        p = r["prediction"]
        lines.append(f"| {r['config']} | " + " | ".join(f"{p[k] / MiB:.0f}" for k in keys) + " |")
    return lines


def commit_of(report: dict[str, Any]) -> tuple[str, bool]:
    """The commit a report was measured at (10 digits; "?": unknown) and whether leantune's sources
    had uncommitted changes: from ``benchlib.source()``, or the ``git`` entry of older reports."""
    src, old = report.get("source") or {}, report.get("git") or {}
    commit = src.get("git_commit") or old.get("commit") or "?"
    return commit[:10], bool(src.get("uncommitted") or old.get("dirty_sources"))


def format_markdown(report: dict[str, Any]) -> str:
    rows, s = report["rows"], report["summary"]
    commit, dirty = commit_of(report)
    out = [
        "# `leantune estimate` against measured peak memory",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; {report['machine']}; torch threads: {report['threads']}; "
        f"steps per config: {report['steps']}; glibc `MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD}`; "
        f"commit {commit}" + (" (with uncommitted changes in src/)" if dirty else "") + ".",
        "",
        "Measured: peak RSS (`VmHWM`) of a fresh process over the training steps (the high-water mark is",
        "reset after the model and optimizer are built). Predicted: `leantune.estimate.estimate_memory`",
        "with device `cpu`. Error = (predicted - measured) / measured.",
        "",
        *format_table(rows),
        "",
    ]
    if s:
        out += [
            f"**Max |error| {s['max_abs_error'] * 100:.1f}%, mean |error| {s['mean_abs_error'] * 100:.1f}%; "
            f"{s['within_target']}/{s['count']} configurations within {s['target'] * 100:.0f}%.**",
            "",
        ]
    out += ["Predicted breakdown at the peak moment (MiB):", "", *_breakdown_table(rows), ""]
    built = [r for r in rows if r["measurement"].get("build_peak_rss", 0) > r["measured"]]
    if built:
        out += [
            "## Model construction can peak higher than training",
            "",
            "`leantune.models.build_model` initialises a preset in fp32 and then casts it, so for bf16",
            "runs the process peak during construction (before the steps) can exceed the training peak:",
            "",
            "| config | construction peak GiB | training peak GiB |",
            "|---|---|---|",
            *(
                f"| {r['config']} | {r['measurement']['build_peak_rss'] / GiB:.3f} | "
                f"{r['measured'] / GiB:.3f} |"
                for r in built
            ),
            "",
        ]
    if report.get("default_malloc"):
        out += [
            "## glibc default malloc (no fixed mmap threshold)",
            "",
            "The same configurations measured with glibc's adaptive mmap threshold: freed tensors up to",
            "32 MiB stay in the heap, so RSS is above live memory and the estimate under-predicts it.",
            "",
            *format_table(report["default_malloc"]),
            "",
        ]
    return "\n".join(out)


def _plot(rows: list[dict[str, Any]], path: Path, default_malloc: list[dict[str, Any]] | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 6))
    xs = [r["measured"] / GiB for r in rows]
    ys = [r["predicted"] / GiB for r in rows]
    dx = [r["measured"] / GiB for r in default_malloc or []]
    dy = [r["predicted"] / GiB for r in default_malloc or []]
    hi = max(xs + ys + dx) * 1.1
    ax.plot([0, hi], [0, hi], color="black", lw=1, label="predicted = measured")
    ax.fill_between([0, hi], [0, hi * (1 - TARGET)], [0, hi * (1 + TARGET)], color="green", alpha=0.12)
    ax.plot([], [], color="green", alpha=0.3, lw=6, label=f"±{TARGET * 100:.0f}%")
    ax.scatter(xs, ys, zorder=3, label=f"MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD} (validated)")
    if dx:
        ax.scatter(dx, dy, marker="x", color="tab:orange", zorder=3, label="glibc default malloc")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["config"], (x, y), fontsize=6, xytext=(3, -3), textcoords="offset points")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("measured peak RSS (GiB)")
    ax.set_ylabel("predicted peak (GiB)")
    ax.set_title("leantune estimate vs measurement (CPU)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated configuration names (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per worker (default 2)")
    parser.add_argument(
        "--default-malloc",
        default=",".join(DEFAULT_MALLOC),
        help="configurations to re-measure with glibc's default malloc ('' for none)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path without extension")
    parser.add_argument(
        "--from-json", type=Path, help="rewrite <out>.md/.png from a saved <out>.json, no runs"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        benchlib.emit_result(run_worker(json.loads(args.worker)))
        return 0
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        args.out.with_suffix(".md").write_text(format_markdown(report) + "\n")
        _plot(report["rows"], args.out.with_suffix(".png"), report.get("default_malloc"))
        return 0
    by_name = {c.name: c for c in CONFIGS}
    names = [n.strip() for n in args.only.split(",")] if args.only else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(f"unknown configuration(s) {unknown}; known: {', '.join(by_name)}", file=sys.stderr)
        return 2
    rows, default_rows = [], []
    extra = [n.strip() for n in args.default_malloc.split(",") if n.strip() and n.strip() in names]
    print(format_table([])[0])
    for name in names:
        cfg = by_name[name]
        t0 = time.time()
        meas = _run_subprocess(cfg, threads=args.threads, steps=args.steps, default_malloc=False)
        row = _row(name, predict(cfg), meas)
        rows.append(row)
        print(format_table([row])[2], f"({time.time() - t0:.0f} s)", flush=True)
    for name in extra:
        meas = _run_subprocess(by_name[name], threads=args.threads, steps=args.steps, default_malloc=True)
        default_rows.append(_row(name + " (default malloc)", predict(by_name[name]), meas))
        print(format_table([default_rows[-1]])[2], flush=True)
    report = {
        "command": "python benchmarks/estimate_validation.py" + (" " + " ".join(argv) if argv else ""),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "threads": args.threads,
        "steps": args.steps,
        "rows": rows,
        "summary": _summary(rows),
        "default_malloc": default_rows,
    }
    try:
        import torch
        import transformers

        report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    except ImportError:
        pass
    report["source"] = benchlib.source()
    benchlib.write_report(args.out, report, format_markdown(report) + "\n")
    _plot(rows, args.out.with_suffix(".png"), default_rows)
    s = report["summary"]
    if s:
        print(
            f"max |error| {s['max_abs_error'] * 100:.1f}%, mean {s['mean_abs_error'] * 100:.1f}%, "
            f"{s['within_target']}/{s['count']} within {TARGET * 100:.0f}%; wrote {args.out}.md/.json/.png"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
