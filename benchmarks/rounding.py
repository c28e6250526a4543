"""bf16 weights without lost updates: AdaLomo and LOMO under each rounding mode against fp32 weights.

The case the rounding modes exist for is *fine-tuning*: a pre-trained model stored in bf16 receives
updates that are small relative to its weights. AdaLomo's step is ``lr * RMS(w) * u`` with
``RMS(u) <= 1``, so at a fine-tuning lr of 1e-3 a typical element moves by ~1e-3 of its magnitude,
below half a bf16 ulp (2^-9..2^-8 relative, 2e-3..4e-3): round-to-nearest throws most updates
away. (From scratch at lr 0.05 the updates are ~25x larger and mostly survive; that regime would
hide the effect.) So the benchmark has two phases on the ``tiny`` preset with the built-in tasks:

1. **pre-train** (once, shared): fp32, AdaLomo lr 0.05 (the default job's settings) on the task
   families ``reverse, sort, count`` only. Its training data excludes every evaluation prompt of
   phase 2, and its final model is evaluated on phase 2's evaluation set.
2. **fine-tune** (each configuration in a *fresh subprocess*, same seed, same data order): from
   that fp32 checkpoint, loaded in the configuration's dtype (fp32 -> bf16 by round-to-nearest, as
   ``leantune train model.dtype=bf16`` does), on all four families (``add`` is new to the model),
   AdaLomo lr 1e-3 (the paper's fine-tuning lr) or LOMO lr 3e-2 with global-norm clipping 1.0
   (the top of the LOMO paper's range), warmup 30 steps, cosine to 10%.

Configurations: {adalomo, lomo} x {fp32, bf16-nearest, bf16-stochastic, bf16-kahan}, and
adalomo-fp16-stochastic (``optim.loss_scale=dynamic``; CPU fp16 matmuls are ~10x slower than bf16,
so lomo-fp16-stochastic runs only when named in ``--only``). Each fine-tune run is
``leantune train`` (the :class:`leantune.trainer.Trainer` API with the same overrides, listed in
the JSON) with instrumentation:

* final eval loss / perplexity / exact match (all 400 held-out prompts), and the eval loss of the
  final weights upcast to fp32 (separates weight storage from bf16 compute in the forward pass);
* **fraction of weights changed per step**, measured directly: every ``--measure-every`` steps the
  worker snapshots the weights, runs the step, and counts elements that differ. For fp32 runs it
  also counts the updates smaller than half a bf16 ulp of the weight (what bf16-nearest would drop);
* **time**: median time per training step (forward + backward with fused update) over the
  un-instrumented steps, and the median time per step spent in the optimizer's per-parameter
  update and in its write-back (``WriteBack.apply``, where the rounding happens), as ratios to
  ``bf16-nearest`` of the same optimizer measured in the same run. Both the wall clock and the
  process CPU time are recorded; with one torch thread per run the CPU time is the work itself and
  is far less disturbed by other processes on a shared machine, so the verdicts use it;
* **memory**: peak RSS of the training loop (high-water mark reset when the loop starts; on this
  small model the interpreter dominates it) and the analytic bytes of weights + Kahan buffers +
  optimizer state.

Then (``--memory-preset``, default ``0.1b``: 134 M parameters, batch 1 x 128 random tokens) the same
configurations (not fp16) run a few steps on a larger model, where the weights dominate RSS and
the update is a visible part of the step: peak RSS, s/step and update time, again as ratios to
bf16-nearest.

Goal (from the issue): bf16 + stochastic within 1% of fp32's final eval loss, at the memory of
bf16 and at most 5% more time per step than bf16-nearest. Time ratios need a quiet machine: the
load average before and after is recorded, and the report says when the machine was busy.

Run (from the repository root, venv active; ~25 min on 2 quiet cores, mostly the fp16 row)::

    python benchmarks/rounding.py
    python benchmarks/rounding.py --steps 100 --pretrain-steps 300 --skip-memory --only \\
        adalomo-fp32,adalomo-bf16-nearest,adalomo-bf16-stochastic        # a quick look
    python benchmarks/rounding.py --work /tmp/rb   # keep run dirs; a matching pre-train is reused

Results: ``benchmarks/results/rounding.{json,md,png}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import difflib
import json
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import fmt, ratio
from leantune.rss import proc_status_kib, release_free_memory, reset_peak_rss

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rounding"
MIB = 1024**2
TARGETS = {"eval_loss_vs_fp32": 1.01, "time_vs_nearest": 1.05}
REFERENCE_ROUNDING = "nearest"  # time and memory ratios are to bf16-nearest of the same optimizer


@dataclass(frozen=True)
class Setup:
    """One fine-tuning configuration."""

    optimizer: str  # adalomo | lomo
    dtype: str  # fp32 | bf16 | fp16
    rounding: str  # nearest | stochastic | kahan (fp32: nearest, where it changes nothing)

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{self.dtype}" + ("" if self.dtype == "fp32" else f"-{self.rounding}")

    @property
    def label(self) -> str:
        opt = {"adalomo": "AdaLomo", "lomo": "LOMO"}[self.optimizer]
        return f"{opt} {self.dtype}" + ("" if self.dtype == "fp32" else f" {self.rounding}")


SETUPS: dict[str, Setup] = {
    s.name: s
    for opt in ("adalomo", "lomo")
    for s in (
        Setup(opt, "fp32", "nearest"),
        Setup(opt, "bf16", "nearest"),
        Setup(opt, "bf16", "stochastic"),
        Setup(opt, "bf16", "kahan"),
        Setup(opt, "fp16", "stochastic"),
    )
}
DEFAULT_SETUPS = [n for n in SETUPS if n != "lomo-fp16-stochastic"]


# ----------------------------------------------------------------------------- process memory
# ----------------------------------------------------------------------------- instrumentation
# Per-step timings: wall clock and process CPU time. With one torch thread the CPU time is the work
# itself; on a shared machine it is far less disturbed by other processes than the wall clock.
TIMING_KEYS = (
    "s_per_step",
    "cpu_s_per_step",
    "update_s_per_step",
    "update_cpu_s_per_step",
    "write_s_per_step",
    "write_cpu_s_per_step",
)


class _Clock:
    """Times training steps, and the time a fused optimizer spends in ``_update`` and ``writer.apply``.

    Both methods are wrapped on the instance (benchmark-only instrumentation): ``_update`` is the
    whole per-parameter update (statistics, step size, write-back), ``writer.apply`` the fp32 update
    of a chunk plus its rounding into the weight's dtype, i.e. the part the rounding mode changes.
    """

    def __init__(self, opt: Any) -> None:
        self.steps: list[dict[str, float]] = []
        self._acc = dict.fromkeys(TIMING_KEYS[2:], 0.0)
        for attr, owner, key in (("_update", opt, "update"), ("apply", opt.writer, "write")):
            setattr(owner, attr, self._timed(getattr(owner, attr), key))

    def _timed(self, fn: Any, key: str) -> Any:
        acc = self._acc

        def timed(*a: Any, **k: Any) -> None:
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                fn(*a, **k)
            finally:
                acc[f"{key}_s_per_step"] += time.perf_counter() - w0
                acc[f"{key}_cpu_s_per_step"] += time.process_time() - c0

        return timed

    @contextlib.contextmanager
    def step(self, record: bool = True):
        """Time one training step (``record=False``: run it untimed)."""
        for key in self._acc:
            self._acc[key] = 0.0
        w0, c0 = time.perf_counter(), time.process_time()
        yield
        if record:
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            self.steps.append({"s_per_step": wall, "cpu_s_per_step": cpu, **self._acc})

    def medians(self) -> dict[str, float]:
        return {key: statistics.median(s[key] for s in self.steps) for key in TIMING_KEYS}


def _buffer_bytes(model: Any, opt: Any) -> dict[str, int]:
    """Analytic bytes of what lives for the whole run: weights, Kahan buffers, other optimizer state."""
    import torch

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kahan = state = 0
    for st in opt.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                n = value.numel() * value.element_size()
                if key == "kahan":
                    kahan += n
                else:
                    state += n
    return {"weights": weights, "kahan": kahan, "optimizer_state": state, "total": weights + kahan + state}


def _changed(before: list[Any], after: list[Any]) -> tuple[int, int, int]:
    """(elements changed, fp32 updates below half a bf16 ulp of the weight, elements)."""
    import torch

    changed = dropped = total = 0
    inf = torch.tensor(float("inf"), dtype=torch.bfloat16)
    for b, a in zip(before, after):
        a = a.detach()
        diff = a != b
        changed += int(diff.sum())
        total += b.numel()
        if b.dtype == torch.float32:
            # What bf16 round-to-nearest would drop: a non-zero update below half the bf16 spacing
            # of the weight's magnitude.
            mag = b.abs().to(torch.bfloat16)
            spacing = torch.nextafter(mag, inf).float() - mag.float()
            delta = (a - b).abs()
            dropped += int((diff & (delta < spacing / 2)).sum())
    return changed, dropped, total


# ----------------------------------------------------------------------------- workers
def _common_overrides(s: dict[str, Any], work: Path) -> list[str]:
    return [
        f"model.preset={s['preset']}",
        f"train.batch_size={s['batch']}",
        f"train.seed={s['seed']}",
        f"data.num_eval={s['num_eval']}",
        f"data.seed={s['data_seed']}",
        f"eval.accuracy_samples={s['num_eval']}",
        f"eval.every={s['eval_every']}",
        f"log.every={s['eval_every']}",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        f"train.output_dir={work}",
    ]


def _finetune_overrides(s: dict[str, Any], setup: Setup, work: Path) -> list[str]:
    out = [
        *_common_overrides(s, work),
        f"model.path={work / 'pretrain' / 'final'}",
        f"model.dtype={setup.dtype}",
        f"data.tasks={','.join(s['tasks'])}",
        f"data.num_train={s['num_train']}",
        f"train.max_steps={s['steps']}",
        f"optim.name={setup.optimizer}",
        f"optim.lr={s['adalomo_lr'] if setup.optimizer == 'adalomo' else s['lomo_lr']}",
        f"optim.rounding={setup.rounding}",
    ]
    if setup.optimizer == "lomo":
        out.append(f"optim.clip_grad_norm={s['lomo_clip']}")
    if setup.dtype == "fp16":
        out.append("optim.loss_scale=dynamic")
    return [*out, f"train.run_name={setup.name}"]


def _measured_trainer(measure_every: int):
    """A Trainer that times steps, counts changed weights, reads peak RSS, and evaluates only the
    loss mid-run (exact match once, at the end)."""
    import torch

    from leantune.evaluate import eval_loss
    from leantune.trainer import Trainer

    class Measured(Trainer):
        def setup(self) -> None:
            super().setup()
            self.clock = _Clock(self.optimizer)
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
            self.changed: list[dict[str, Any]] = []

        def _loss_only(self) -> dict[str, Any]:
            return eval_loss(
                self.model,
                self.data.eval,
                batch_size=self.cfg.train.batch_size,
                pad_id=self.tokenizer.pad_token_id,
                device=self.device,
            )

        def train(self):
            self.start_eval = self._loss_only()  # the pre-trained model in this run's dtype
            release_free_memory()
            self.mem = {"peak_reset": reset_peak_rss(), "rss_start_kib": proc_status_kib("VmRSS")}
            return super().train()

        def train_step(self) -> dict[str, Any]:
            measure = measure_every > 0 and self.step % measure_every == 0
            before = [p.detach().clone() for p in self.trainable] if measure else None
            with self.clock.step(record=not measure):  # a snapshot would distort the timing
                out = super().train_step()
            if before is not None:
                with torch.no_grad():
                    changed, dropped, total = _changed(before, self.trainable)
                self.changed.append(
                    {
                        "step": self.step + 1,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "changed": changed / total,
                        "below_bf16_half_ulp": dropped / total,
                        "skipped": bool(out.skipped),
                    }
                )
            return out

        def evaluate(self) -> dict[str, Any]:
            if self.step < self.total_steps:
                self.last_eval = self._loss_only()
                return self.last_eval
            self.mem.setdefault("peak_kib", proc_status_kib("VmHWM"))  # before evaluation allocates
            return super().evaluate()

    return Measured


def _eval_curve(run_dir: Path, start: float, final: float | None, steps: int) -> list[list[float]]:
    from leantune.monitor import read_metrics

    rows = read_metrics(run_dir)
    curve = [[0, start]]
    curve += [[r["step"], r["eval_loss"]] for r in rows if r.get("kind") == "eval" and r["step"] < steps]
    if final is not None:
        curve.append([steps, final])
    return curve


def _train_curve(run_dir: Path) -> list[list[float]]:
    from leantune.monitor import read_metrics

    return [[r["step"], r["loss"]] for r in read_metrics(run_dir) if r.get("kind") == "train"]


def _pretrain_worker(s: dict[str, Any], work: Path) -> dict[str, Any]:
    """Phase 1: fp32 AdaLomo on the pre-training families, evaluated on phase 2's eval set."""
    from leantune.config import load_config
    from leantune.data import generate_examples
    from leantune.trainer import Trainer

    # Phase 2 uses the built-in data with all families; its evaluation set is drawn exactly as
    # leantune.data.build_datasets draws it (seed + 1, unique), and phase 1 never trains on it.
    eval_recs = generate_examples(s["tasks"], s["num_eval"], s["data_seed"] + 1, unique=True)
    train_recs = generate_examples(
        s["pretrain_tasks"], s["num_train"], s["data_seed"], exclude={r["prompt"] for r in eval_recs}
    )
    for name, recs in (("pretrain_train.jsonl", train_recs), ("eval.jsonl", eval_recs)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    overrides = [
        *_common_overrides(s, work),
        f"data.train={work / 'pretrain_train.jsonl'}",
        f"data.eval={work / 'eval.jsonl'}",
        f"train.max_steps={s['pretrain_steps']}",
        "optim.name=adalomo",
        f"optim.lr={s['pretrain_lr']}",
        "eval.every=0",
        "train.run_name=pretrain",
    ]
    shutil.rmtree(work / "pretrain", ignore_errors=True)
    summary = Trainer(load_config(None, overrides)).run()
    m = summary.metrics
    return {
        "config": "pretrain",
        "overrides": overrides,
        "steps": summary.steps,
        "train_seconds": m["train_seconds"],
        "eval_loss": m["eval_loss"],
        "eval_ppl": m["eval_ppl"],
        "acc": m.get("acc"),
        **{k: v for k, v in m.items() if k.startswith("acc/")},
        "final_dir": str(summary.final_dir),
    }


def _finetune_worker(s: dict[str, Any], work: Path, setup: Setup) -> dict[str, Any]:
    """Phase 2 for one configuration: fine-tune, then report quality, changed weights, time, memory."""
    import torch

    from leantune.config import load_config
    from leantune.evaluate import eval_loss

    overrides = _finetune_overrides(s, setup, work)
    shutil.rmtree(work / setup.name, ignore_errors=True)
    trainer = _measured_trainer(s["measure_every"])(load_config(None, overrides))
    summary = trainer.run()
    m = summary.metrics
    expected = [json.loads(x)["response"] for x in (work / "eval.jsonl").read_text().splitlines()]
    buffers = _buffer_bytes(trainer.model, trainer.optimizer)
    with torch.no_grad():
        trainer.model.float()  # the run is over: upcast in place to separate storage from compute
        fp32_compute = eval_loss(
            trainer.model,
            trainer.data.eval,
            batch_size=s["batch"],
            pad_id=trainer.tokenizer.pad_token_id,
            device=trainer.device,
        )["eval_loss"]
    measured = [c for c in trainer.changed if not c["skipped"]]
    scaler = getattr(trainer.optimizer, "loss_scaler", None)
    return {
        "config": setup.name,
        "label": setup.label,
        "optimizer": setup.optimizer,
        "dtype": setup.dtype,
        "rounding": setup.rounding,
        "lr": float(next(o for o in overrides if o.startswith("optim.lr=")).split("=", 1)[1]),
        "overrides": overrides,
        "command": "leantune train " + " ".join(shlex.quote(o) for o in overrides),
        "steps": summary.steps,
        "eval_set_matches_pretrain": [x.answer for x in trainer.data.eval] == expected,
        "eval_loss_start": trainer.start_eval["eval_loss"],
        "eval_loss": m["eval_loss"],
        "eval_ppl": m["eval_ppl"],
        "eval_loss_fp32_compute": fp32_compute,
        "acc": m.get("acc"),
        "acc_samples": m.get("acc_samples"),
        **{k: v for k, v in m.items() if k.startswith("acc/")},
        "eval_curve": _eval_curve(
            summary.run_dir, trainer.start_eval["eval_loss"], m["eval_loss"], s["steps"]
        ),
        "train_curve": _train_curve(summary.run_dir),
        "changed_per_step": trainer.changed,
        "changed_fraction": statistics.mean(c["changed"] for c in measured) if measured else None,
        "below_bf16_half_ulp_fraction": (
            statistics.mean(c["below_bf16_half_ulp"] for c in measured) if measured else None
        ),
        **trainer.clock.medians(),
        "timed_steps": len(trainer.clock.steps),
        "train_seconds": m["train_seconds"],
        "peak_rss_mib": trainer.mem["peak_kib"] / 1024,
        "rss_start_mib": trainer.mem["rss_start_kib"] / 1024,
        "peak_rss_source": "VmHWM reset at loop start" if trainer.mem["peak_reset"] else "VmHWM (process)",
        "bytes": buffers,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "skipped_steps": trainer.nonfinite_total,
        "final_loss_scale": scaler.scale if scaler is not None else None,
    }


def _memory_worker(s: dict[str, Any], setup: Setup) -> dict[str, Any]:
    """The configuration's optimizer on a larger preset and random tokens: RSS and time per step."""
    import torch

    from leantune.models import build_model, resolve_dtype
    from leantune.optim import build_optimizer

    model = build_model(preset=s["memory_preset"], dtype=resolve_dtype(setup.dtype), seed=s["seed"])
    model.config.use_cache = False
    model.train()
    kwargs: dict[str, Any] = {
        "lr": s["adalomo_lr"] if setup.optimizer == "adalomo" else s["lomo_lr"],
        "rounding": setup.rounding,
        "seed": s["seed"],
    }
    if setup.optimizer == "lomo":
        kwargs["clip_grad_norm"] = s["lomo_clip"]
    if setup.dtype == "fp16":
        kwargs["loss_scale"] = "dynamic"
    opt = build_optimizer(setup.optimizer, model, **kwargs)
    clock = _Clock(opt)
    g = torch.Generator().manual_seed(s["seed"])
    ids = torch.randint(0, model.config.vocab_size, (s["memory_batch"], s["memory_seq"]), generator=g)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        opt.backward(loss)
        return float(loss.detach())

    step()  # warm-up: optimizer state and Kahan buffers are created here
    release_free_memory()
    rss_ready = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    losses = []
    for _ in range(s["memory_steps"]):
        with clock.step():
            losses.append(step())
    return {
        "config": setup.name,
        "preset": s["memory_preset"],
        "seq": s["memory_seq"],
        "batch": s["memory_batch"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
        "rss_ready_mib": rss_ready / 1024,
        "peak_rss_source": "VmHWM reset after warm-up" if reset else "VmHWM (process)",
        **clock.medians(),
        "step_times_s": [x["s_per_step"] for x in clock.steps],
        "step_cpu_s": [x["cpu_s_per_step"] for x in clock.steps],
        "losses": losses,
        "bytes": _buffer_bytes(model, opt),
    }


def run_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process: ``params["job"]`` is ``pretrain``, a configuration name, or
    ``memory:<configuration>``; ``params["settings"]`` the benchmark settings."""
    import torch

    s = params["settings"]
    torch.set_num_threads(s["threads"])
    work = Path(s["work"])
    work.mkdir(parents=True, exist_ok=True)
    job = params["job"]
    if job == "pretrain":
        return _pretrain_worker(s, work)
    if job.startswith("memory:"):
        return _memory_worker(s, SETUPS[job.removeprefix("memory:")])
    return _finetune_worker(s, work, SETUPS[job])


# ----------------------------------------------------------------------------- parent
def _run_child(settings: dict[str, Any], job: str, timeout: float) -> dict[str, Any]:
    payload = {"job": job, "settings": settings}
    env = benchlib.thread_env(settings["threads"])
    result = benchlib.run_one(__file__, payload, label=job, timeout=timeout, env=env)
    if "error" in result:
        print(f"  {job}: FAILED ({result['error']})", flush=True)
        return {"config": job, "ok": False, **result}
    result["ok"] = True
    print(f"  {job}: done in {result['process_wall_seconds']:.0f} s", flush=True)
    return result


def _reference(rows: dict[str, dict[str, Any]], optimizer: str, dtype: str, rounding: str):
    r = rows.get(Setup(optimizer, dtype, rounding).name)
    return r if r is not None and r.get("ok") else None


def summarize(pretrain: dict[str, Any], finetune: list[dict[str, Any]], memory: list[dict[str, Any]]):
    """Adds the ratios (to fp32 / to bf16-nearest of the same optimizer) and the goal verdicts."""
    rows = {r["config"]: r for r in finetune}
    mem = {m["config"]: m for m in memory}
    for r in finetune:
        if not r.get("ok"):
            continue
        fp32 = _reference(rows, r["optimizer"], "fp32", "nearest")
        near = _reference(rows, r["optimizer"], "bf16", REFERENCE_ROUNDING)
        r["eval_loss_vs_fp32"] = ratio(r["eval_loss"], fp32 and fp32["eval_loss"])
        for key in (*TIMING_KEYS, "peak_rss_mib"):
            r[f"{key}_vs_nearest"] = ratio(r[key], near and near[key])
        r["bytes_vs_nearest"] = ratio(r["bytes"]["total"], near and near["bytes"]["total"])
    for m in memory:
        if not m.get("ok"):
            continue
        setup = SETUPS[m["config"]]
        near = mem.get(Setup(setup.optimizer, "bf16", REFERENCE_ROUNDING).name)
        near = near if near and near.get("ok") else None
        for key in (*TIMING_KEYS, "peak_rss_mib"):
            m[f"{key}_vs_nearest"] = ratio(m[key], near and near[key])
    goals = {}
    for opt in ("adalomo", "lomo"):
        sto = _reference(rows, opt, "bf16", "stochastic")
        if sto is None:
            continue
        big = mem.get(Setup(opt, "bf16", "stochastic").name)
        big = big if big and big.get("ok") else None

        def below(value: float | None, limit: float) -> bool | None:
            return None if value is None else value <= limit

        near_big = mem.get(Setup(opt, "bf16", REFERENCE_ROUNDING).name)
        extra_ns = None  # extra write-back CPU time per parameter and step: what rounding costs
        if big and near_big and near_big.get("ok"):
            extra = big["write_cpu_s_per_step"] - near_big["write_cpu_s_per_step"]
            extra_ns = 1e9 * extra / big["parameters"]
        goals[opt] = {
            "eval_loss_vs_fp32": sto["eval_loss_vs_fp32"],
            "loss_met": below(sto["eval_loss_vs_fp32"], TARGETS["eval_loss_vs_fp32"]),
            "bytes_vs_nearest": sto["bytes_vs_nearest"],
            "bytes_met": None if sto["bytes_vs_nearest"] is None else sto["bytes_vs_nearest"] <= 1.0,
            "peak_rss_vs_nearest_large": big and big["peak_rss_mib_vs_nearest"],
            # the verdicts use CPU time (robust on a shared machine); wall-clock ratios are reported too
            "time_vs_nearest": sto["cpu_s_per_step_vs_nearest"],
            "wall_time_vs_nearest": sto["s_per_step_vs_nearest"],
            "time_met": below(sto["cpu_s_per_step_vs_nearest"], TARGETS["time_vs_nearest"]),
            "time_vs_nearest_large": big and big["cpu_s_per_step_vs_nearest"],
            "wall_time_vs_nearest_large": big and big["s_per_step_vs_nearest"],
            "time_met_large": below(big and big["cpu_s_per_step_vs_nearest"], TARGETS["time_vs_nearest"]),
            "extra_write_ns_per_parameter": extra_ns,
        }
    return {"pretrain": pretrain, "finetune": finetune, "memory": memory, "goals": goals}


def _x(row: dict[str, Any], key: str, spec: str = ".2f") -> str:
    """``row[key]`` as a ratio to bf16-nearest, e.g. ``1.04×``."""
    return fmt(row.get(f"{key}_vs_nearest"), spec, "×")


def _yes(flag: bool | None) -> str:
    return "–" if flag is None else ("**yes**" if flag else "**no**")


def _tasks_of(report: dict[str, Any]) -> list[str]:
    return report["settings"]["tasks"]


def format_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    pre = report["pretrain"]
    rows = [r for r in report["finetune"] if r.get("ok")]
    failed = [r for r in [*report["finetune"], *report["memory"]] if not r.get("ok")]
    tasks = _tasks_of(report)
    machine = report["machine"]
    out = [
        "# bf16 weights without lost updates: rounding modes against fp32",
        "",
        f"Preset `{s['preset']}` ({rows[0]['parameters']:,} parameters), built-in tasks, batch "
        f"{s['batch']}, seed {s['seed']}, {s['threads']} thread(s) per run, each configuration in a "
        "fresh subprocess with the same data order and rounding seed."
        if rows
        else "No fine-tuning run succeeded.",
        "",
        f"**Phase 1 (pre-train, shared):** fp32, AdaLomo lr {s['pretrain_lr']:g}, {s['pretrain_steps']} "
        f"steps on `{', '.join(s['pretrain_tasks'])}` (never on phase 2's eval prompts). On phase 2's "
        f"eval set: loss {pre.get('eval_loss', float('nan')):.4f}, exact match "
        f"{fmt(pre.get('acc'), '.1%')}"
        + "".join(f", {t} {fmt(pre.get(f'acc/{t}'), '.1%')}" for t in tasks)
        + ".",
        "",
        f"**Phase 2 (fine-tune, per configuration):** from that fp32 checkpoint loaded in the row's "
        f"dtype, {s['steps']} steps on `{', '.join(tasks)}`, warmup 30, cosine to 10%; AdaLomo lr "
        f"{s['adalomo_lr']:g} (relative), LOMO lr {s['lomo_lr']:g} with `clip_grad_norm={s['lomo_clip']:g}`; "
        f"fp16 with `loss_scale=dynamic`. Eval on {s['num_eval']} held-out prompts (exact match on all).",
        "",
        "## Quality",
        "",
        "| configuration | eval loss at start | final eval loss | ×fp32 | eval loss, fp32 compute | ppl | "
        "exact match | " + " | ".join(tasks) + " | weights changed / step | fp32 updates < ½ bf16 ulp |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | "
        + " | ".join("---:" for _ in tasks)
        + " | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['eval_loss_start']:.4f} | {r['eval_loss']:.4f} | "
            f"{fmt(r.get('eval_loss_vs_fp32'), '.3f', '×')} | {r['eval_loss_fp32_compute']:.4f} | "
            f"{r['eval_ppl']:.3f} | {fmt(r.get('acc'), '.1%')} | "
            + " | ".join(fmt(r.get(f"acc/{t}"), ".1%") for t in tasks)
            + f" | {fmt(r['changed_fraction'], '.1%')} | "
            f"{fmt(r['below_bf16_half_ulp_fraction'] if r['dtype'] == 'fp32' else None, '.1%')} |"
        )
    out += [
        "",
        "## Cost",
        "",
        "Ratios are to bf16-nearest of the same optimizer, measured in the same run. Time: median over "
        "the un-instrumented training steps, as process CPU time (one torch thread: the work itself, "
        "little disturbed by other processes) and wall clock; update = the optimizer's per-parameter "
        "updates, write-back = `WriteBack.apply` (fp32 update of a chunk + rounding), CPU time summed "
        "per step.",
        "",
        "| configuration | CPU s/step | ×nearest | wall s/step | ×nearest | update CPU ms/step | ×nearest | "
        "write-back CPU ms/step | ×nearest | peak RSS MiB | weights MiB | Kahan MiB | optimizer state MiB "
        "| skipped steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        b = r["bytes"]
        out.append(
            f"| {r['label']} | {r['cpu_s_per_step']:.4f} | {_x(r, 'cpu_s_per_step', '.3f')} "
            f"| {r['s_per_step']:.4f} | {_x(r, 's_per_step', '.2f')} | "
            f"{1e3 * r['update_cpu_s_per_step']:.2f} | "
            f"{_x(r, 'update_cpu_s_per_step', '.2f')} | "
            f"{1e3 * r['write_cpu_s_per_step']:.2f} | {_x(r, 'write_cpu_s_per_step', '.2f')} "
            f"| {r['peak_rss_mib']:.0f} | {b['weights'] / MIB:.2f} | {b['kahan'] / MIB:.2f} | "
            f"{b['optimizer_state'] / MIB:.3f} | {r['skipped_steps']} |"
        )
    mem = [m for m in report["memory"] if m.get("ok")]
    if mem:
        m0 = mem[0]
        out += [
            "",
            f"## Memory and time on a larger model (`{m0['preset']}`, {m0['parameters']:,} parameters, "
            f"batch {m0['batch']} × {m0['seq']} random tokens, {s['memory_steps']} timed steps after one "
            "warm-up step, median)",
            "",
            "| configuration | peak RSS MiB | ×nearest | weights + Kahan + state MiB (analytic) | CPU s/step "
            "| ×nearest | wall s/step | ×nearest | update CPU s/step | ×nearest | write-back CPU s/step "
            "| ×nearest |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in mem:
            out.append(
                f"| {SETUPS[m['config']].label} | {m['peak_rss_mib']:.0f} | "
                f"{_x(m, 'peak_rss_mib', '.3f')} | {m['bytes']['total'] / MIB:.0f} | "
                f"{m['cpu_s_per_step']:.2f} | {_x(m, 'cpu_s_per_step', '.2f')} | "
                f"{m['s_per_step']:.2f} | {_x(m, 's_per_step', '.2f')} | "
                f"{m['update_cpu_s_per_step']:.3f} | "
                f"{_x(m, 'update_cpu_s_per_step', '.2f')} | "
                f"{m['write_cpu_s_per_step']:.3f} | {_x(m, 'write_cpu_s_per_step', '.2f')} |"
            )
    goals = report["goals"]
    if goals:
        out += [
            "",
            "## Goal: bf16 + stochastic within 1% of fp32's eval loss, at bf16's memory, ≤ 5% more time "
            "per step than bf16-nearest",
            "",
            "| optimizer | eval loss ×fp32 | within 1% | persistent bytes ×nearest | peak RSS ×nearest "
            "(larger model) | step CPU time ×nearest (learning runs; wall) | ≤ 1.05 | step CPU time "
            "×nearest (larger model; wall) | ≤ 1.05 | rounding cost, CPU ns per parameter and step |",
            "| --- | ---: | :---: | ---: | ---: | ---: | :---: | ---: | :---: | ---: |",
        ]
        for opt, g in goals.items():
            out.append(
                f"| {'AdaLomo' if opt == 'adalomo' else 'LOMO'} | "
                f"{fmt(g['eval_loss_vs_fp32'], '.4f', '×')} | "
                f"{_yes(g['loss_met'])} | {fmt(g['bytes_vs_nearest'], '.3f', '×')} | "
                f"{fmt(g['peak_rss_vs_nearest_large'], '.3f', '×')} | "
                f"{fmt(g['time_vs_nearest'], '.3f', '×')} ({fmt(g['wall_time_vs_nearest'], '.2f', '×')}) | "
                f"{_yes(g['time_met'])} | {fmt(g['time_vs_nearest_large'], '.2f', '×')} "
                f"({fmt(g['wall_time_vs_nearest_large'], '.2f', '×')}) | {_yes(g['time_met_large'])} | "
                f"{fmt(g['extra_write_ns_per_parameter'], '.1f')} |"
            )
        out += [
            "",
            "Rounding cost: the write-back CPU time of bf16-stochastic minus bf16-nearest on the larger "
            "model, per parameter. The time goal depends on the work per step: the extra time is this "
            "cost × parameters, while forward and backward grow with the tokens per step.",
        ]
    raw_load = machine["load_before"], machine["load_after"]
    busy = max(x[0] for x in raw_load if x) > 0.5 * (machine["cpus"] or 1) if all(raw_load) else True
    load = tuple(benchlib.format_load(x) for x in raw_load)
    out += [
        "",
        "Notes:",
        "- Eval loss at start: the pre-trained fp32 model loaded in the row's dtype, before any update "
        "(the cost of the conversion itself). Eval loss, fp32 compute: the final weights upcast to fp32, "
        "so the difference to the final eval loss is the bf16/fp16 forward pass, not the stored weights.",
        f"- Weights changed / step: mean over the steps measured every {s['measure_every']} steps (snapshot, "
        "one step, count differing elements; skipped fp16 steps excluded). For fp32 rows the last column "
        "counts the updates smaller than half a bf16 ulp of their weight: what bf16-nearest loses.",
        "- Peak RSS of the learning runs: the training loop's high-water mark (reset when the loop starts); "
        "on this small model the interpreter and libraries dominate it: the larger-model table is the "
        "memory comparison. Kahan buffers are in the weight's dtype (2 bytes per parameter).",
        "- fp16 on CPU: fp16 matmuls are not accelerated (~10× slower than bf16 here), and dynamic loss "
        "scaling adds a measuring backward pass; its time is not comparable to bf16's. fp16 is left out of "
        "the larger-model runs.",
        f"- Machine: {machine['platform']}, {machine['cpu_model']}, {machine['cpus']} CPUs shared with other "
        f"jobs; load average (1/5/15 min) before {load[0]}, after {load[1]}. "
        + (
            "**The machine was busy: time ratios are indicative only; rerun on a quiet machine before "
            "relying on the 5% time target.**"
            if busy
            else "The machine was quiet."
        ),
        f"- Total {report['total_seconds'] / 60:.1f} min. Command: `{report['command']}`. Every run's "
        "`leantune train` overrides are in the JSON.",
        benchlib.source_note(report.get("source")),
    ]
    for r in failed:
        out.append(
            f"- **{r['config']} failed**: `{r['error'].strip().splitlines()[-1] if r['error'] else '?'}`"
        )
    return "\n".join(out) + "\n"


def format_text_table(report: dict[str, Any]) -> str:
    head = [
        "configuration",
        "eval loss",
        "xfp32",
        "acc",
        "changed/step",
        "CPU s/step",
        "xnearest",
        "upd ms",
        "xnearest",
    ]
    lines = [head]
    for r in report["finetune"]:
        if not r.get("ok"):
            lines.append([r["config"], "FAILED"] + [""] * (len(head) - 2))
            continue
        lines.append(
            [
                r["label"],
                f"{r['eval_loss']:.4f}",
                fmt(r.get("eval_loss_vs_fp32"), ".3f"),
                fmt(r.get("acc"), ".1%"),
                fmt(r["changed_fraction"], ".1%"),
                f"{r['cpu_s_per_step']:.4f}",
                fmt(r.get("cpu_s_per_step_vs_nearest"), ".3f"),
                f"{1e3 * r['update_cpu_s_per_step']:.2f}",
                fmt(r.get("update_cpu_s_per_step_vs_nearest"), ".2f"),
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["finetune"] if r.get("ok")]
    styles = {"fp32": ("k", "-"), "nearest": ("C3", "--"), "stochastic": ("C0", "-"), "kahan": ("C2", ":")}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, opt in zip(axes[0], ("adalomo", "lomo")):
        for r in (r for r in rows if r["optimizer"] == opt):
            color, ls = styles["fp32" if r["dtype"] == "fp32" else r["rounding"]]
            if r["dtype"] == "fp16":
                color, ls = "C1", "-."
            xs, ys = zip(*r["eval_curve"])
            ax.plot(xs, ys, color=color, ls=ls, label=f"{r['label']} ({r['eval_loss']:.4f})")
        ax.set_title(f"{'AdaLomo' if opt == 'adalomo' else 'LOMO'} fine-tune: eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    labels = [r["label"] for r in rows]
    x = list(range(len(rows)))
    ax = axes[1][0]
    ax.bar(x, [r["changed_fraction"] or 0.0 for r in rows], color="#1f77b4")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fraction of weights changed per step")
    ax.set_ylim(0, 1.05)
    ax.set_title("weights changed per step (measured)")
    ax = axes[1][1]
    w = 0.4
    timed = [r for r in rows if r["dtype"] != "fp16"]  # CPU fp16 matmuls: not comparable
    xt = list(range(len(timed)))
    ax.bar([i - w / 2 for i in xt], [r.get("cpu_s_per_step_vs_nearest") or 0 for r in timed], w, label="step")
    ax.bar(
        [i + w / 2 for i in xt],
        [r.get("update_cpu_s_per_step_vs_nearest") or 0 for r in timed],
        w,
        label="optimizer update",
    )
    ax.axhline(1.0, color="#999", lw=1)
    ax.axhline(TARGETS["time_vs_nearest"], color="C3", lw=1, ls="--", label="goal: 1.05× nearest (step)")
    ax.set_xticks(xt, [r["label"] for r in timed], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("CPU time × bf16-nearest (same optimizer)")
    ax.set_title("CPU time per step, median (learning runs; fp16 not shown)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--pretrain-tasks", default="reverse,sort,count")
    p.add_argument("--tasks", default="add,reverse,sort,count", help="fine-tuning (and evaluation) families")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-lr", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default: 300)")
    p.add_argument("--adalomo-lr", type=float, default=1e-3)
    p.add_argument("--lomo-lr", type=float, default=3e-2)
    p.add_argument("--lomo-clip", type=float, default=1.0, help="LOMO clip_grad_norm (default: 1.0)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=400)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50, help="loss-only evaluations for the curves")
    p.add_argument("--measure-every", type=int, default=10, help="steps between changed-weight counts")
    p.add_argument(
        "--only", help=f"comma-separated subset of {', '.join(SETUPS)} (default: all but lomo-fp16)"
    )
    p.add_argument("--memory-preset", default="0.1b")
    p.add_argument("--memory-seq", type=int, default=128)
    p.add_argument("--memory-batch", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=4)
    p.add_argument("--skip-memory", action="store_true", help="no larger-model memory/time runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, help="run directories (default: a temporary directory, removed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = [
        "preset", "pretrain_steps", "pretrain_lr", "steps", "adalomo_lr", "lomo_lr", "lomo_clip", "batch",
        "num_train", "num_eval", "data_seed", "seed", "eval_every", "measure_every", "memory_preset",
        "memory_seq", "memory_batch", "memory_steps", "threads",
    ]  # fmt: skip
    s = {k: getattr(args, k) for k in keys}
    s["pretrain_tasks"] = [t.strip() for t in args.pretrain_tasks.split(",") if t.strip()]
    s["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    s["work"] = str(args.work)
    return s


def _pretrain(settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run phase 1, or reuse it from the work directory when its settings match."""
    work = Path(settings["work"])
    saved = work / "pretrain_result.json"
    keys = (
        "preset",
        "pretrain_steps",
        "pretrain_lr",
        "batch",
        "num_train",
        "num_eval",
        "data_seed",
        "seed",
        "pretrain_tasks",
        "tasks",
        "threads",
    )
    wanted = {k: settings[k] for k in keys}
    if saved.is_file():
        old = json.loads(saved.read_text())
        if old.get("settings") == wanted and Path(old["result"]["final_dir"]).is_dir():
            print("phase 1: reusing the pre-trained model in the work directory", flush=True)
            return old["result"]
    print(
        f"phase 1: pre-train {settings['pretrain_steps']} steps on {', '.join(settings['pretrain_tasks'])}",
        flush=True,
    )
    result = _run_child(settings, "pretrain", timeout)
    if result.get("ok"):
        saved.write_text(json.dumps({"settings": wanted, "result": result}))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        params = json.loads(args.worker)
        benchlib.emit_result(run_worker(params))
        return 0
    names = DEFAULT_SETUPS if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in SETUPS:
            close = difflib.get_close_matches(n, list(SETUPS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            parser.error(f"unknown configuration {n!r}.{hint} Known: {', '.join(SETUPS)}")
    args.work, keep_work = benchlib.work_dir(args.work, "rounding")
    settings = _settings(args)
    load_before = benchlib.loadavg()
    t0 = time.perf_counter()
    pretrain = _pretrain(settings, args.timeout)
    if not pretrain.get("ok"):
        print(pretrain["detail"], file=sys.stderr)
        return 1
    print(f"  pre-trained: eval loss {pretrain['eval_loss']:.4f}, exact match {pretrain['acc']:.1%}")
    print(f"phase 2: fine-tune {settings['steps']} steps on {', '.join(settings['tasks'])}", flush=True)
    finetune = [_run_child(settings, name, args.timeout) for name in names]
    memory = []
    if not args.skip_memory:
        print(f"memory/time: preset {args.memory_preset}, seq {args.memory_seq}", flush=True)
        memory = [
            _run_child(settings, f"memory:{name}", args.timeout)
            for name in names
            if SETUPS[name].dtype != "fp16"
        ]
        for m in memory:
            m["config"] = m["config"].removeprefix("memory:")
    report = summarize(pretrain, finetune, memory)
    report.update(
        {
            "benchmark": "rounding",
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python benchmarks/rounding.py "
            + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "settings": settings,
            "setups": {n: vars(SETUPS[n]) for n in names},
            "targets": TARGETS,
            "total_seconds": time.perf_counter() - t0,
            "machine": {**benchlib.machine(), "load_before": load_before, "load_after": benchlib.loadavg()},
            "source": benchlib.source(),
        }
    )
    md = format_markdown(report)
    benchlib.write_report(args.out, report, md, indent=1)
    if any(r.get("ok") for r in finetune):
        _plot(report, args.out.with_suffix(".png"))
    print()
    print(format_text_table(report))
    print()
    print(md)
    print(f"written: {args.out}.json/.md/.png ({report['total_seconds'] / 60:.1f} min)")
    if not keep_work:
        shutil.rmtree(args.work, ignore_errors=True)
    return report


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
