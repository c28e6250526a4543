"""Shared pieces of the reliability tests: a tiny run configuration, CLI launchers, comparisons.

Every run trains the ``test`` preset (2 layers, hidden 32) on a few hundred built-in examples in
fp32 on the CPU, so that a whole run takes seconds and results are bitwise reproducible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from leantune.config import load_config
from leantune.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
SLOW_CLI = Path(__file__).with_name("slow_cli.py")

TINY = [
    "model.preset=test",
    "data.num_train=200",
    "data.num_eval=16",
    "data.tasks=reverse,sort",
    "train.batch_size=4",
    "train.device=cpu",
    "optim.warmup_steps=2",
    "eval.every=0",
    "eval.accuracy_samples=0",
    "log.every=1",
    "log.progress=false",
    "log.plot=false",
    "log.tensorboard=false",
]

# Both optimizer paths of the trainer: fused into backward (AdaLomo) and torch + Stepper (AdamW),
# each with gradient accumulation.
OPTIMIZERS = {
    "adalomo": ["optim.name=adalomo", "optim.lr=0.05"],
    "adamw": ["optim.name=adamw", "optim.lr=3e-3"],
}
# Low-precision weights: bf16 with stochastic rounding (optim.rounding=auto picks it; its generator
# state must survive a kill), fp16 with dynamic loss scaling (the scale and its growth counter too).
LOW_PRECISION = {
    "adalomo-bf16": ["optim.name=adalomo", "optim.lr=0.05", "model.dtype=bf16"],
    "lomo-fp16": ["optim.name=lomo", "optim.lr=0.05", "model.dtype=fp16", "optim.loss_scale=dynamic"],
}
RUN = [*TINY, "train.accumulation_steps=2", "train.max_steps=12", "train.save_every=3", "train.keep_last=2"]


def run_args(optimizer: str, out: Path, name: str, *extra: str) -> list[str]:
    setting = OPTIMIZERS.get(optimizer) or LOW_PRECISION[optimizer]
    return [*RUN, *setting, f"train.output_dir={out}", f"train.run_name={name}", *extra]


def train_in_process(args: list[str]):
    """A run through :class:`Trainer` in this process (the reference runs)."""
    return Trainer(load_config(None, args)).run()


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def start_cli(args: list[str], log: Path, *, slow: bool = False, extra_env: dict | None = None):
    """``leantune train ARGS`` in a subprocess (``slow``: checkpoint writes slowed, see slow_cli.py);
    stdout/stderr go to ``log``.out / ``log``.err."""
    entry = [str(SLOW_CLI)] if slow else ["-m", "leantune"]
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:  # the child keeps its copies
        return subprocess.Popen(
            [sys.executable, *entry, "train", *args],
            stdout=out,
            stderr=err,
            cwd=REPO,
            env={**env(), **(extra_env or {})},
        )


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if rec.get("kind") == kind:
            out.append(rec)
    return out


def losses(run_dir: Path) -> list[tuple[int, float, int]]:
    """(step, loss, skipped steps so far) of every logged training step."""
    return [(r["step"], r["loss"], r["skipped_steps"]) for r in records(run_dir)]


def last_step(run_dir: Path) -> int:
    recs = records(run_dir)
    return recs[-1]["step"] if recs else 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.005) -> bool:
    """Poll until ``condition()`` holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(poll)
    raise TimeoutError("the training subprocess did not get there in time")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"


def all_finite(directory: Path) -> bool:
    return all(torch.isfinite(t).all() for t in weights(directory).values())
