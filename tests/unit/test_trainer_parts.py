"""Pieces the trainer resolves from its config, against closed forms: the learning-rate schedule
(warmup, then constant / linear / cosine down to ``optim.min_lr_ratio``) and the rounding that
``optim.rounding=auto`` picks for the model's dtype."""

from __future__ import annotations

import math

import pytest
import torch

from leantune.config import load_config
from leantune.trainer import Trainer
from leantune.training.build import build_scheduler

LR = 0.2


def expected_lr(t: int, total: int, warmup: int, schedule: str, ratio: float) -> float:
    """The schedule the docs state, written out: ``warm = min(warmup, total - 1)`` linear warmup
    steps from ``lr / (warm + 1)`` to ``lr``, then over ``rest = total - warm`` steps down to
    ``lr * min_lr_ratio``."""
    warm = min(warmup, total - 1)
    if t < warm:
        return LR * (t + 1) / (warm + 1)
    rest, s = total - warm, t - warm
    low = LR * ratio
    if schedule == "constant":
        return LR
    if schedule == "linear":
        return LR * (1 - (1 - ratio) * min(s, rest) / rest)
    return low + (LR - low) * (1 + math.cos(math.pi * s / rest)) / 2


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(
    ("total", "warmup", "ratio"),
    [(10, 3, 0.1), (10, 0, 0.25), (4, 10, 0.1), (7, 2, 0.0)],
    ids=["warmup-3", "no-warmup", "warmup-longer-than-run", "to-zero"],
)
def test_schedule_matches_its_closed_form(schedule, total, warmup, ratio):
    cfg = load_config(
        None,
        [f"optim.scheduler={schedule}", f"optim.warmup_steps={warmup}", f"optim.min_lr_ratio={ratio}",
         f"optim.lr={LR}"],
    )  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = build_scheduler(opt, cfg, total)
    got = []
    for _ in range(total + 1):  # one past the end: the last step's lr is the floor
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [expected_lr(t, total, warmup, schedule, ratio) for t in range(total + 1)]
    # abs: LinearLR cannot end at factor 0, the trainer ends it at 1e-8
    assert got == pytest.approx(want, rel=1e-6, abs=2e-8 * LR)
    if schedule != "constant":
        assert got[-1] == pytest.approx(LR * ratio, abs=2e-8 * LR)  # min_lr_ratio is reached


@pytest.mark.parametrize(
    ("dtype", "rounding", "resolved"),
    [
        ("fp32", "auto", "nearest"),
        ("bf16", "auto", "stochastic"),
        ("fp16", "auto", "stochastic"),
        ("bf16", "nearest", "nearest"),
        ("fp32", "stochastic", "stochastic"),
    ],
)
def test_trainer_resolves_rounding_for_the_weight_dtype(tmp_path, dtype, rounding, resolved):
    args = [
        "model.preset=test",
        f"model.dtype={dtype}",
        f"optim.rounding={rounding}",
        "optim.name=adalomo",
        "data.num_train=16",
        "train.batch_size=4",
        "data.num_eval=4",
        "train.device=cpu",
        "log.progress=false",
        "log.tensorboard=false",
        f"train.output_dir={tmp_path}",
        *(["optim.loss_scale=dynamic"] if dtype == "fp16" else []),
    ]
    t = Trainer(load_config(None, args))
    try:
        t.setup()
        assert t.optimizer.rounding == resolved
        assert next(t.model.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                      "fp16": torch.float16}[dtype]  # fmt: skip
    finally:
        t.close()
