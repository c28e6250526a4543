"""Numerical faults: a non-finite loss or gradient skips the step (warned, counted in
``metrics.jsonl``), too many in a row stop the run with a diagnosis (exit code 1), and no weight
file is ever written with an inf/nan in it."""

from __future__ import annotations

import re

import pytest
import torch

from leantune.checkpoint import find_checkpoints, verify_checkpoint
from leantune.cli import main
from leantune.config import load_config
from leantune.optim import LOMO, AdaLomo, Stepper, build_optimizer
from leantune.optim.collectives import Collectives
from leantune.optim.engine import GradientView
from leantune.trainer import Trainer, TrainingError
from tests.helpers import batch, loss_of, tiny_llama
from tests.reliability.common import TINY, all_finite, records

NAN = float("nan")


class Faulty(Trainer):
    """Injects faults at given optimizer steps (1-based): a NaN loss in the first micro-batch, a
    NaN gradient of one weight (the loss stays finite), or a NaN written into a weight."""

    nan_loss: set[int] = set()
    nan_grad: set[int] = set()
    poison: set[int] = set()
    target = "model.layers.0.mlp.down_proj.weight"

    def setup(self):
        super().setup()
        self.snapshots = {}
        loss_fn = self.loss_fn  # the trainer's loss (chunked or standard) of each micro-batch

        def faulty_loss(model, batch):
            loss = loss_fn(model, batch)
            if self.step + 1 in self.nan_loss and not self._micro:
                loss = loss * NAN
            self._micro += 1
            return loss

        self.loss_fn = self.objective.loss_fn = faulty_loss

    def train_step(self):
        self._micro = 0
        step = self.step + 1
        params = dict(self.model.named_parameters())
        handle = params[self.target].register_hook(lambda g: g * NAN) if step in self.nan_grad else None
        before = {k: v.detach().clone() for k, v in params.items()}
        out = super().train_step()
        if handle is not None:
            handle.remove()
        self.snapshots[step] = (before, {k: v.detach().clone() for k, v in params.items()})
        if step in self.poison:
            with torch.no_grad():
                params[self.target][0, 0] = NAN
        return out


def _args(tmp_path, *extra):
    return [
        *TINY,
        "train.max_steps=8",
        "train.save_every=2",
        "train.keep_last=10",
        f"train.output_dir={tmp_path}",
        "train.run_name=r",
        *extra,
    ]


def _faulty(args, **faults):
    cls = type("F", (Faulty,), {k: set(v) for k, v in faults.items()})
    return cls(load_config(None, args))


@pytest.mark.parametrize(
    "optimizer",
    [["optim.name=adalomo", "train.accumulation_steps=2"], ["optim.name=adamw", "optim.lr=3e-3"]],
    ids=["adalomo-accum", "adamw"],
)
def test_nonfinite_loss_and_gradient_steps_are_skipped_warned_and_counted(optimizer, tmp_path, capsys):
    trainer = _faulty(_args(tmp_path, *optimizer), nan_loss={3}, nan_grad={5})
    summary = trainer.run()
    assert summary.steps == 8 and not summary.interrupted
    out = capsys.readouterr().out
    assert "warning: step 3 skipped: non-finite loss (1 in a row, 1 in all)" in out
    fused = "adalomo" in optimizer[0]
    if fused:  # no measuring pass: only the tensor with the bad gradient sits the step out
        assert "warning: step 5 had a non-finite gradient in some tensors" in out
    else:
        assert "warning: step 5 skipped: non-finite gradient (1 in a row, 2 in all)" in out
    skipped = {r["step"]: r["skipped_steps"] for r in records(summary.run_dir)}
    assert [skipped[s] for s in range(1, 9)] == [0, 0, 1, 1, 2, 2, 2, 2]
    # step 3 changed nothing; step 5 changed nothing (adamw) or all but the faulty tensor (adalomo)
    before, after = trainer.snapshots[3]
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = trainer.snapshots[5]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == (set(before) - {Faulty.target} if fused else set())
    assert all(torch.isfinite(v).all() for v in after.values())
    for path in find_checkpoints(summary.run_dir / "checkpoints"):
        verify_checkpoint(path)
        assert all_finite(path / "model")
    assert all_finite(summary.final_dir)


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_with_a_diagnosis(tmp_path, capsys):
    # A learning rate of 1e30: the first update blows the weights up, every later loss is inf/nan.
    args = _args(
        tmp_path, "optim.name=adamw", "optim.lr=1e30", "optim.warmup_steps=0", "train.max_nonfinite=3"
    )
    args[args.index("train.save_every=2")] = "train.save_every=1"
    assert main(["train", *args]) == 1
    captured = capsys.readouterr()
    for step in (2, 3, 4):
        assert f"warning: step {step} skipped: non-finite loss" in captured.out
    err = captured.err
    assert re.search(
        r"stopped: 3 consecutive steps had a non-finite loss or gradient \(last at step 4, "
        r"train\.max_nonfinite=3\)\. No inf/nan reached the weights .*Likely causes: learning rate too "
        r"high \(optim\.lr=1e\+30\).*Resume from the last checkpoint with gradient clipping",
        err,
        re.S,
    ), err
    command = re.search(r"\n  leantune train (.+)\n", err).group(1)
    assert "train.resume=auto" in command and command.endswith("optim.clip_grad_norm=1.0")
    ckpts = find_checkpoints(tmp_path / "r" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000001", "step-000002", "step-000003"]
    for path in ckpts:
        verify_checkpoint(path)
        assert all_finite(path / "model")
    assert not (tmp_path / "r" / "final").exists()
    # Clipping may be switched on when resuming (the run continues instead of being refused).
    import shlex

    assert main(["train", *shlex.split(command)]) == 1
    assert "cannot resume" not in capsys.readouterr().err


def test_weights_with_nan_are_never_written(tmp_path, capsys):
    trainer = _faulty(_args(tmp_path, "optim.name=lomo", "optim.lr=0.01"), poison={3})
    with pytest.raises(
        TrainingError,
        match=r"refusing to write the checkpoint of step 4: the weights hold "
        r"inf/nan \(model\.layers\.0\.mlp\.down_proj\.weight\)",
    ) as info:
        trainer.run()
    assert "Earlier checkpoints are intact" in str(info.value)
    assert "optim.clip_grad_norm=1.0" in str(info.value)
    ckpts = find_checkpoints(tmp_path / "r" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000002"]
    verify_checkpoint(ckpts[0])
    assert all_finite(ckpts[0] / "model")
    assert not list((tmp_path / "r" / "checkpoints").glob(".*"))
    assert not (tmp_path / "r" / "final").exists()


# ----------------------------------------------------------------- the optimizers themselves


FUSED = {
    "adalomo": lambda m, **kw: AdaLomo(m, lr=1e-2, **kw),
    "lomo": lambda m, **kw: LOMO(m, lr=1e-2, **kw),
    "adamw_in_backward": lambda m, **kw: build_optimizer(
        "adamw_in_backward", m, lr=1e-2, weight_decay=0.0, **kw
    ),
}


def _state_finite(opt):
    return all(
        torch.isfinite(v).all()
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.is_floating_point()
    )


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_update_without_measuring_pass_skips_a_nonfinite_gradient(name, accumulation, device):
    model = tiny_llama(device=device)
    opt = FUSED[name](model, accumulation_steps=accumulation)
    bad = model.model.layers[1].mlp.up_proj.weight
    for s in range(2):  # a clean start, so that the optimizer has state and momentum
        for m in range(accumulation):
            opt.backward(loss_of(model, batch(10 * s + m)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m in range(accumulation):  # the inf arrives in the first micro-batch
        handle = bad.register_hook(lambda g: g * float("inf")) if m == 0 else None
        result = opt.backward(loss_of(model, batch(100 + m)))
        if handle is not None:
            handle.remove()
    assert result.updated and result.zeroed and not result.skipped
    assert all(torch.isfinite(p).all() for p in model.parameters()) and _state_finite(opt)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    target = "model.layers.1.mlp.up_proj.weight"
    if device.type == "cpu":
        # On the CPU the tensor with the inf gradient is left untouched; everything else is updated.
        assert changed == set(before) - {target}
    else:
        # On an accelerator its gradient is zeroed on the device and its update runs: a zero gradient
        # moves no weight under LOMO and AdaLomo (no weight decay here); AdamW's momentum still does.
        moved = {target} if name == "adamw_in_backward" else set()
        assert changed == (set(before) - {target}) | moved
    again = opt
    for m in range(accumulation):
        result = again.backward(loss_of(model, batch(200 + m)))
    assert result.updated and not result.zeroed


@pytest.mark.parametrize("name", list(FUSED))
def test_the_finite_check_does_not_change_a_clean_update(name, monkeypatch, device):
    # On the CPU the check reads each gradient; on CUDA it rewrites it (nan_to_num, times 1.0).
    def run():
        model = tiny_llama(device=device)
        opt = FUSED[name](model, accumulation_steps=2)
        for s in range(6):
            opt.backward(loss_of(model, batch(s)))
        return [p.detach().clone() for p in model.parameters()]

    guarded = run()
    monkeypatch.setattr(GradientView, "has_nonfinite", lambda self, n: False)
    monkeypatch.setattr(
        GradientView, "zero_unless_finite", lambda self, n: torch.zeros((), dtype=torch.bool, device=device)
    )
    plain = run()
    assert all(torch.equal(a, b) for a, b in zip(guarded, plain))


def test_stepper_skips_a_nonfinite_gradient_without_clipping(device):
    model = tiny_llama(device=device)
    stepper = Stepper(torch.optim.AdamW(model.parameters(), lr=1e-2))
    stepper.backward(loss_of(model, batch(0)))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in stepper.optimizer.state.items()}
    handle = model.model.layers[0].self_attn.q_proj.weight.register_hook(lambda g: g * NAN)
    result = stepper.backward(loss_of(model, batch(1)))
    handle.remove()
    assert result.skipped and not result.updated and result.grad_norm != result.grad_norm
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for p, st in stepper.optimizer.state.items():
        assert all(torch.equal(st[k], state[p][k]) for k in st)
    assert stepper.backward(loss_of(model, batch(2))).updated


def test_device_side_zeroing_used_on_accelerators(device):
    # The path taken on CUDA (no per-tensor host sync): on CUDA tensors in the cuda variant,
    # exercised directly on CPU tensors in the cpu one.
    g = torch.randn(6, 4, device=device)
    g[2, 1] = float("inf")
    acc = torch.randn(6, 4, device=device)
    view = GradientView(g, acc)
    assert bool(view.zero_unless_finite(8)) and view.has_nonfinite(8) is False
    assert torch.count_nonzero(g) == 0 and torch.count_nonzero(acc) == 0
    clean = torch.randn(6, 4, device=device)
    copy = clean.clone()
    assert not bool(GradientView(clean, None).zero_unless_finite(8))
    assert torch.equal(clean, copy)


class _ShardedInOneProcess(Collectives):
    """Identity collectives that declare sharding (as FSDP2's do), in a single process."""

    sharded = True


@pytest.mark.parametrize("name", list(FUSED))
def test_sharded_tensors_zero_a_nonfinite_gradient_instead_of_skipping_the_update(name, device):
    # Under FSDP every rank must enter each tensor's shard collectives, so no rank may skip a tensor
    # on its own: the non-finite gradient is zeroed and the update runs (with a zero gradient).
    model = tiny_llama(device=device)
    opt = FUSED[name](model)
    opt.collectives = _ShardedInOneProcess()
    bad = model.model.layers[1].mlp.up_proj.weight
    calls = []
    update = opt._update
    opt._update = lambda t, view, group, state: (calls.append(t.key is bad), update(t, view, group, state))[1]
    opt.backward(loss_of(model, batch(0)))
    handle = bad.register_hook(lambda g: g * float("inf"))
    result = opt.backward(loss_of(model, batch(1)))
    handle.remove()
    assert result.updated and result.zeroed and not result.skipped
    assert calls.count(True) == 2  # the tensor with the inf gradient was updated both times
    assert all(torch.isfinite(p).all() for p in model.parameters()) and _state_finite(opt)
