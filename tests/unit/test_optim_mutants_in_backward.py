"""InBackward against plain torch loops: the options it forwards to the engine, the checks of its
constructor, its inner optimizers' hyperparameters and state after freezing, one inner optimizer
per segment (survivors of mutmut)."""

from __future__ import annotations

import re

import pytest
import torch

from leantune.optim import LOMO, InBackward
from leantune.optim.collectives import Collectives

LR = 0.1


def _linear(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).to(dtype)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = _data(step)
    return ((model(x.to(model.weight.dtype)).float() - y) ** 2).mean()


def _grads(model: torch.nn.Module, step: int) -> list[torch.Tensor]:
    """The gradients of a copy of ``model`` (the reference loops' input)."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x, y = _data(step)
    loss = ((x @ params[0].T + params[1] - y) ** 2).mean()
    return list(torch.autograd.grad(loss, params))


def test_the_default_seed_is_zero():
    """The documented default seed of the stochastic-rounding generator is 0."""
    opt = InBackward(torch.optim.SGD, _linear(), lr=LR, rounding="stochastic")
    assert opt.seed == 0 and opt.state_dict()["leantune"]["seed"] == 0


def test_the_seed_given_is_the_one_saved():
    opt = InBackward(torch.optim.SGD, _linear(), lr=LR, rounding="stochastic", seed=7)
    assert opt.state_dict()["leantune"]["seed"] == 7


@pytest.mark.parametrize("cls", [torch.nn.Linear, int, "adamw", torch.optim.SGD([torch.zeros(1)])])
def test_an_optimizer_cls_that_is_not_an_optimizer_class_is_refused_by_name(cls):
    """Classes that are not optimizers and non-classes get the same message, naming what was given."""
    message = f"optimizer_cls must be a torch.optim.Optimizer subclass, got {cls!r}"
    with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
        InBackward(cls, _linear(), lr=LR)


@pytest.mark.parametrize("cls", [LOMO, torch.optim.LBFGS])
def test_fused_optimizers_and_lbfgs_are_refused_by_name(cls):
    with pytest.raises(TypeError, match=f"^{cls.__name__} cannot run inside backward$"):
        InBackward(cls, _linear(), lr=LR)


def test_clip_grad_value_equals_clamping_every_element_then_sgd():
    model = _linear()
    start = [p.detach().clone() for p in model.parameters()]
    opt = InBackward(torch.optim.SGD, model, lr=LR, clip_grad_value=0.05)
    expected = [p.clone() for p in start]
    for step in range(3):
        ref_model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for p, e in zip(ref_model.parameters(), expected):
                p.copy_(e)
        grads = _grads(ref_model, step)
        assert any(g.abs().max() > 0.05 for g in grads)  # the clamp bites
        expected = [e - LR * g.clamp(-0.05, 0.05) for e, g in zip(expected, grads)]
        opt.backward(_loss(model, step))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


def _sgd_reference(model: torch.nn.Module, steps: int, scale: float = 1.0) -> list[torch.Tensor]:
    """Plain SGD on ``model``'s starting weights, with every gradient multiplied by ``scale``."""
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(steps):
        ref_model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for p, e in zip(ref_model.parameters(), expected):
                p.copy_(e)
        expected = [e - LR * scale * g for e, g in zip(expected, _grads(ref_model, step))]
    return expected


def test_a_static_loss_scale_is_reported_and_divided_out_of_the_update():
    model = _linear()
    expected = _sgd_reference(model, 2)
    opt = InBackward(torch.optim.SGD, model, lr=LR, loss_scale=8.0)
    results = [opt.backward(_loss(model, step)) for step in range(2)]
    assert [r.loss_scale for r in results] == [8.0, 8.0]
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


class _HalvingCollectives(Collectives):
    """Replicated data parallelism with a second rank whose gradient is zero: the mean is half."""

    replicated = True

    def average_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.mul_(0.5)


def test_the_collectives_given_average_the_gradients():
    model = _linear()
    expected = _sgd_reference(model, 2, scale=0.5)
    opt = InBackward(torch.optim.SGD, model, lr=LR, collectives=_HalvingCollectives())
    for step in range(2):
        opt.backward(_loss(model, step))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


class _Shards(Collectives):
    sharded = True


def test_a_statistics_optimizer_on_shards_is_refused_with_the_elementwise_alternatives():
    with pytest.raises(ValueError) as err:
        InBackward(torch.optim.Adagrad, _linear(), lr=LR, collectives=_Shards())
    assert str(err.value) == (
        "Adagrad in backward on FSDP2 shards would compute its statistics on one shard of each tensor; "
        "use AdaLomo, LOMO, or one of AdamW, Adam, SGD, Lion, Adan in backward "
        "(elementwise updates are exact on a shard)"
    )
    InBackward(torch.optim.AdamW, _linear(), lr=LR, collectives=_Shards())  # elementwise: accepted


def test_init_state_then_training_equals_torch_adamw_with_amsgrad():
    """The inner optimizers get every keyword (amsgrad), also for the state made by init_state."""
    model, ref = _linear(), _linear()
    opt = InBackward(torch.optim.AdamW, model, lr=LR, weight_decay=0.1, amsgrad=True)
    opt.init_state()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1, amsgrad=True)
    for step in range(3):
        opt.backward(_loss(model, step))
        _loss(ref, step).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert set(opt.state[model.weight]) == set(ref_opt.state[ref.weight]) >= {"max_exp_avg_sq"}
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


def test_a_parameter_frozen_and_trainable_again_restarts_from_fresh_adamw_state():
    model, ref = _linear(), _linear()
    opt = InBackward(torch.optim.AdamW, model, lr=LR)
    ref_w, ref_b = torch.optim.AdamW([ref.weight], lr=LR), torch.optim.AdamW([ref.bias], lr=LR)

    def ref_step(step, opts):
        _loss(ref, step).backward()
        for o in opts:
            o.step()
            o.zero_grad()
        ref.weight.grad = None

    for step in range(2):
        opt.backward(_loss(model, step))
        ref_step(step, [ref_w, ref_b])
    model.weight.requires_grad_(False)
    opt.refresh_hooks()
    ref.weight.requires_grad_(False)
    opt.backward(_loss(model, 2))
    ref_step(2, [ref_b])
    model.weight.requires_grad_(True)
    opt.refresh_hooks()
    ref.weight.requires_grad_(True)
    ref_w = torch.optim.AdamW([ref.weight], lr=LR)  # state dropped when frozen: a first step again
    opt.backward(_loss(model, 3))
    ref_step(3, [ref_w, ref_b])
    assert int(opt.state[model.weight]["step"]) == 1
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("init_state", [False, True], ids=["", "after-init-state"])
def test_adan_in_backward_on_two_segments_equals_one_adan_per_segment(init_state):
    """Each segment is a tensor of its own, with its own inner optimizer: pytorch_optimizer's Adan
    counts its steps in the param group (for bias correction), so one Adan over both segments would
    count two steps per update; after init_state each segment starts afresh at its own first update
    (Adan takes its first gradient as the previous one). The oracle: one plain Adan per block."""
    from pytorch_optimizer import Adan

    from leantune.optim.segments import Segment

    def targets(step):
        return torch.randn(4, 2, generator=torch.Generator().manual_seed(step))

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 2))
    blocks = [torch.nn.Parameter(p.detach()[rows].clone()) for rows in (slice(0, 2), slice(2, 4))]
    opt = InBackward(Adan, [p], lr=LR)
    opt.set_segments({p: [Segment("a", rows=(range(0, 2),)), Segment("b", rows=(range(2, 4),))]})
    if init_state:
        opt.init_state()
    refs = [Adan([b], lr=LR) for b in blocks]
    for step in range(3):
        t = targets(step)
        opt.backward(((p - t) ** 2).sum())
        for b, ref, rows in zip(blocks, refs, (slice(0, 2), slice(2, 4))):
            ((b - t[rows]) ** 2).sum().backward()
            ref.step()
            ref.zero_grad()
    torch.testing.assert_close(p.detach(), torch.cat([b.detach() for b in blocks]), rtol=1e-6, atol=1e-7)


def _adan_reference(steps: int) -> list[torch.Tensor]:
    from pytorch_optimizer import Adan

    ref = _linear()
    opt = Adan(ref.parameters(), lr=LR)
    for step in range(steps):
        _loss(ref, step).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in ref.parameters()]


def test_adan_in_backward_after_init_state_equals_plain_adan():
    """Adan counts its steps in the param group (bias correction) and starts its state from the
    first gradient (previous_grad): the zero step that creates the state must leave neither behind."""
    from pytorch_optimizer import Adan

    model = _linear()
    opt = InBackward(Adan, model, lr=LR)
    opt.init_state()
    for step in range(3):
        opt.backward(_loss(model, step))
    for p, r in zip(model.parameters(), _adan_reference(3)):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)


def test_adan_in_backward_resumed_from_its_state_dict_equals_an_uninterrupted_run():
    """Adan's group step count travels in the state dict: a fresh optimizer loaded after step 1
    continues its bias correction at step 2, as plain Adan does, and so does one resumed again
    after step 2 (the restored count is saved again as it advances)."""
    from pytorch_optimizer import Adan

    model = _linear()
    opt = InBackward(Adan, model, lr=LR)
    opt.backward(_loss(model, 0))
    for step in (1, 2):
        saved = opt.state_dict()
        opt.remove_hooks()
        opt = InBackward(Adan, model, lr=LR)
        opt.load_state_dict(saved)
        opt.backward(_loss(model, step))
    for p, r in zip(model.parameters(), _adan_reference(3)):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=0)  # the same arithmetic: bitwise


class _CountingSGD(torch.optim.Optimizer):
    """SGD whose lr decays with a per-parameter step count kept as a Python int (as some
    third-party optimizers keep it), to test InBackward with a state that is not all tensors."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                p.add_(p.grad, alpha=-group["lr"] / state["step"])


def test_init_state_zeroes_a_python_int_step_and_training_then_equals_the_plain_optimizer():
    model, ref = _linear(), _linear()
    opt = InBackward(_CountingSGD, model, lr=LR)
    opt.init_state()
    assert all(st == {"step": 0} and type(st["step"]) is int for st in opt.state.values())
    ref_opt = _CountingSGD(ref.parameters(), lr=LR)
    for step in range(3):
        opt.backward(_loss(model, step))
        _loss(ref, step).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.state[model.weight]["step"] == 3
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


class _Built(torch.optim.Optimizer):
    """SGD scaled by ``factor``, a constructor-only option (not a param-group default, as some
    third-party optimizers keep theirs); counts how many instances were made."""

    made = 0

    def __init__(self, params, lr: float = 0.1, *, factor: float) -> None:
        super().__init__(params, {"lr": lr})
        self.factor = factor
        type(self).made += 1

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * self.factor)


def test_the_inner_optimizers_get_the_constructor_options_and_are_built_once_per_tensor(monkeypatch):
    monkeypatch.setattr(_Built, "made", 0)
    model, ref = _linear(), _linear()
    opt = InBackward(_Built, model, lr=LR, factor=0.5)
    made_by_probe = _Built.made
    for step in range(3):
        opt.backward(_loss(model, step))
    assert _Built.made - made_by_probe == 2  # weight and bias, not one per update
    for step in range(3):
        grads = _grads(ref, step)
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p.add_(g, alpha=-LR * 0.5)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float64, "stochastic"), (torch.bfloat16, "nearest")])
def test_weights_torch_can_update_exactly_are_updated_in_their_own_dtype(dtype, rounding):
    """fp64 weights (any rounding) and bf16 weights with nearest rounding: the inner AdamW steps
    the weight itself, bitwise as plain AdamW on that dtype, no fp32 detour (the effective gradient
    is fp32 by design, so the reference rounds its gradient to fp32 too)."""
    model, ref = _linear(dtype=dtype), _linear(dtype=dtype)
    opt = InBackward(torch.optim.AdamW, model, lr=LR, rounding=rounding)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    for step in range(3):
        opt.backward(_loss(model, step))
        _loss(ref, step).backward()
        for r in ref.parameters():
            r.grad = r.grad.float().to(dtype)
        ref_opt.step()
        ref_opt.zero_grad()
    for p, r in zip(model.parameters(), ref.parameters()):
        assert p.dtype == dtype and torch.equal(p, r)


def test_an_lr_schedulers_group_entries_are_not_saved_as_the_inner_optimizers_own():
    model = _linear()
    opt = InBackward(torch.optim.AdamW, model, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))  # adds initial_lr
    opt.backward(_loss(model, 0))
    sched.step()
    opt.backward(_loss(model, 1))
    assert all(set(st) == {"step", "exp_avg", "exp_avg_sq"} for st in opt.state.values())
