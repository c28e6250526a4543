"""The fused engine's contract: memory, state, resume, loss scaling, frozen params, errors."""

from __future__ import annotations

import gc
import importlib
import io
import re
import warnings

import pytest
import torch

from leantune.optim import (
    LOMO,
    AdaLomo,
    InBackward,
    LossScaler,
    Stepper,
    as_stepper,
    build_optimizer,
    is_fused,
    optimizer_names,
)
from leantune.optim.collectives import Collectives
from tests.helpers import batch, loss_of, tiny_llama
from tests.unit.test_optim_oracles import assert_models_close


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: AdaLomo(m),
        lambda m: AdaLomo(m, clip_grad_norm=1.0),
        lambda m: LOMO(m, clip_grad_norm=1.0, accumulation_steps=2),
        lambda m: InBackward(torch.optim.AdamW, m, lr=1e-3),
    ],
    ids=["adalomo", "adalomo-clip", "lomo-clip-accum", "adamw-in-backward"],
)
def test_live_gradient_memory_never_exceeds_the_largest_parameter(make_opt, device):
    model = tiny_llama(device=device)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    seen = []
    # Registered before the optimizer's hooks, so it runs first and sees the arriving gradient.
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _p: seen.append(grad_bytes(model)))
    opt = make_opt(model)
    for s in range(4):
        opt.backward(loss_of(model, batch(s)))
    assert len(seen) >= 4 * len(list(model.parameters()))
    assert max(seen) <= largest
    assert grad_bytes(model) == 0


def test_plain_backward_keeps_all_gradients_which_the_probe_detects():
    # The probe itself must be able to fail: without a fused optimizer all gradients stay alive.
    model = tiny_llama()
    seen = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _p: seen.append(grad_bytes(model)))
    loss_of(model, batch(0)).backward()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert max(seen) > largest


def save_load(obj_state):
    buf = io.BytesIO()
    torch.save(obj_state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


RESUMABLE = {
    "adalomo": (torch.float32, lambda m: AdaLomo(m, lr=1e-2, weight_decay=0.01)),
    "adalomo-accum-clip": (
        torch.float32,
        lambda m: AdaLomo(m, lr=1e-2, accumulation_steps=2, clip_grad_norm=0.5),
    ),
    "lomo": (torch.float32, lambda m: LOMO(m, lr=1e-2, clip_grad_norm=1.0)),
    "adamw-in-backward": (torch.float32, lambda m: InBackward(torch.optim.AdamW, m, lr=1e-2)),
    "adalomo-bf16-stochastic": (torch.bfloat16, lambda m: AdaLomo(m, lr=1e-2, rounding="stochastic", seed=3)),
    "lomo-bf16-kahan": (torch.bfloat16, lambda m: LOMO(m, lr=1e-2, rounding="kahan")),
    "adalomo-fp16-dynamic": (
        torch.float16,
        lambda m: AdaLomo(m, lr=1e-2, loss_scale=LossScaler(2.0**10, growth_interval=2)),
    ),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_from_state_dict_is_bitwise_identical(name, device):
    dtype, make = RESUMABLE[name]
    steps, split = 6, 3
    model = tiny_llama(dtype=dtype, device=device)
    opt = make(model)
    micro = getattr(opt, "accumulation_steps", 1)
    for s in range(steps * micro):
        opt.backward(loss_of(model, batch(s)))

    model2 = tiny_llama(dtype=dtype, device=device)
    opt2 = make(model2)
    for s in range(split * micro):
        opt2.backward(loss_of(model2, batch(s)))
    saved_model = save_load(model2.state_dict())
    saved_opt = save_load(opt2.state_dict())
    opt2.remove_hooks()
    del opt2, model2

    # a different init: everything must come from the load
    model3 = tiny_llama(seed=123, dtype=dtype, device=device)
    model3.load_state_dict(saved_model)
    opt3 = make(model3)
    opt3.load_state_dict(saved_opt)
    for s in range(split * micro, steps * micro):
        opt3.backward(loss_of(model3, batch(s)))
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    for st_a, st_b in zip(opt.state.values(), opt3.state.values()):
        for key in st_a:
            if torch.is_tensor(st_a[key]):
                assert st_a[key].dtype == st_b[key].dtype
                assert torch.equal(st_a[key], st_b[key]), key
            else:
                assert st_a[key] == st_b[key]


@pytest.mark.parametrize(
    "make", [lambda m: AdaLomo(m, lr=1e-2), lambda m: InBackward(torch.optim.AdamW, m, lr=1e-2)]
)
def test_resume_with_an_lr_scheduler_is_bitwise_identical(make, device):
    # load_state_dict replaces the param-group dicts; the hooks must read the scheduled lr there.
    def build(model):
        opt = make(model)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    model = tiny_llama(device=device)
    opt, sched = build(model)
    for s in range(5):
        opt.backward(loss_of(model, batch(s)))
        sched.step()
    model2 = tiny_llama(device=device)
    opt2, sched2 = build(model2)
    for s in range(2):
        opt2.backward(loss_of(model2, batch(s)))
        sched2.step()
    saved = save_load({"m": model2.state_dict(), "o": opt2.state_dict(), "s": sched2.state_dict()})
    opt2.remove_hooks()
    model3 = tiny_llama(seed=5, device=device)
    model3.load_state_dict(saved["m"])
    opt3, sched3 = build(model3)
    opt3.load_state_dict(saved["o"])
    sched3.load_state_dict(saved["s"])
    for s in range(2, 5):
        opt3.backward(loss_of(model3, batch(s)))
        sched3.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters()))


def test_state_dict_contains_statistics_counters_scaler_and_generators():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = AdaLomo(model, loss_scale=8.0, accumulation_steps=2, rounding="stochastic")
    opt.backward(loss_of(model, batch(0)))
    opt.backward(loss_of(model, batch(1)))
    opt.backward(loss_of(model, batch(2)))  # half-way through the next accumulation
    sd = opt.state_dict()
    assert sd["leantune"]["micro_step"] == 1
    assert sd["leantune"]["loss_scaler"]["scale"] == 8.0
    assert "cpu" in sd["leantune"]["generators"]
    states = list(sd["state"].values())
    assert all(st["step"] == 1 for st in states)
    assert all("grad_acc" in st for st in states)  # the partial step survives a save
    assert sum("row" in st for st in states) == sum(p.dim() == 2 for p in model.parameters())


def test_fp16_overflow_skips_the_step_halves_the_scale_and_grows_back(device):
    model = tiny_llama(dtype=torch.float16, device=device)
    scaler = LossScaler(2.0**10, growth_interval=2)
    opt = AdaLomo(model, lr=1e-2, loss_scale=scaler)
    assert opt.backward(loss_of(model, batch(0))).updated
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {
        k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
        for k, v in opt.state_dict()["state"].items()
    }
    # Inject an inf into the gradient of the *last* parameter to arrive (the embedding): a
    # per-tensor check would already have changed every other weight by then.
    handle = model.model.embed_tokens.weight.register_hook(lambda g: g * float("inf"))
    result = opt.backward(loss_of(model, batch(1)))
    handle.remove()
    assert result.skipped and not result.updated
    assert result.loss_scale == 2.0**10
    assert not torch.isfinite(torch.tensor(result.grad_norm))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for k, st in opt.state_dict()["state"].items():
        assert st["step"] == state_before[k]["step"]
    assert scaler.scale == 2.0**9
    for s in range(2, 4):
        assert opt.backward(loss_of(model, batch(s))).updated
    assert scaler.scale == 2.0**10  # grew back after growth_interval clean steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_one_host_sync_per_step_for_the_overflow_check(monkeypatch, device):
    model = tiny_llama(dtype=torch.float16, device=device)
    opt = AdaLomo(model, loss_scale="dynamic")
    calls = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: (calls.append(1), original(t))[1])
    opt.backward(loss_of(model, batch(0)))
    assert len(calls) == 1


def test_frozen_parameters_are_untouched_stateless_and_hookless():
    model = tiny_llama()
    frozen = {n for n, _ in model.named_parameters() if "self_attn" in n or "embed" in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdaLomo(model, lr=1e-2)
    for s in range(3):
        opt.backward(loss_of(model, batch(s)))
    names = {p: n for n, p in model.named_parameters()}
    assert {names[p] for p in opt.state} == {n for n, _ in model.named_parameters()} - frozen
    assert {names[p] for p in opt.trainable_parameters()} == {n for n, _ in model.named_parameters()} - frozen
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_refresh_hooks_follows_a_new_trainable_set():
    model = tiny_llama()
    opt = LOMO(model, lr=1e-2)
    head = model.lm_head.weight
    opt.backward(loss_of(model, batch(0)))
    head.requires_grad_(False)
    opt.refresh_hooks()
    assert head not in opt.state and all(p is not head for p in opt.trainable_parameters())
    frozen_value = head.detach().clone()
    opt.backward(loss_of(model, batch(1)))
    assert torch.equal(head, frozen_value)


def test_lr_scheduler_drives_the_fused_update_without_warnings():
    ref, ours = tiny_llama(), tiny_llama()
    sgd = torch.optim.SGD(ref.parameters(), lr=5e-2)
    ref_sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
    opt = LOMO(ours, lr=5e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in range(4):
            loss_of(ref, batch(s)).backward()
            sgd.step()
            sgd.zero_grad()
            ref_sched.step()
            opt.backward(loss_of(ours, batch(s)))
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-2 / 16)
    assert_models_close(ours, ref)


def test_plain_backward_on_a_managed_model_is_a_clear_error():
    model = tiny_llama()
    opt = AdaLomo(model)
    with pytest.raises(RuntimeError, match=r"call opt\.backward\(loss\) instead of loss\.backward\(\)"):
        loss_of(model, batch(0)).backward()
    opt.zero_grad()
    opt.remove_hooks()
    loss_of(model, batch(0)).backward()  # detached: ordinary autograd again
    assert model.lm_head.weight.grad is not None


def test_two_live_fused_optimizers_on_one_model_are_refused():
    model = tiny_llama()
    first = AdaLomo(model)
    with pytest.raises(ValueError, match="already managed by another fused optimizer"):
        LOMO(model)
    del first
    gc.collect()
    second = LOMO(model)  # the first one is gone: its hooks are inert
    assert second.backward(loss_of(model, batch(0))).updated


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda m: AdaLomo(m, lr=-1.0), "Invalid learning rate"),
        (lambda m: AdaLomo(m, lr="big"), "Invalid learning rate"),
        (lambda m: LOMO(m, lr=-0.1), "Invalid learning rate"),
        (lambda m: AdaLomo(m, weight_decay=-1.0), "Invalid weight_decay"),
        (lambda m: LOMO(m, lr=True), "Invalid learning rate"),
        (lambda m: LOMO(m, weight_decay=float("nan")), "Invalid weight_decay"),
        (lambda m: AdaLomo(m, eps=(0.0, 1e-3)), "Invalid eps"),
        (lambda m: AdaLomo(m, eps=1e-3), "Invalid eps"),
        (lambda m: AdaLomo(m, decay_rate=0.5), "Invalid decay_rate"),
        (lambda m: AdaLomo(m, clip_threshold=0.0), "Invalid clip_threshold"),
        (lambda m: AdaLomo(m, accumulation_steps=0), "Invalid accumulation_steps"),
        (lambda m: AdaLomo(m, accumulation_steps=1.5), "Invalid accumulation_steps"),
        (lambda m: LOMO(m, clip_grad_norm=-1.0), "Invalid clip_grad_norm"),
        (lambda m: LOMO(m, clip_grad_value=0), "Invalid clip_grad_value"),
        (lambda m: LOMO(m, rounding="up"), "Invalid rounding"),
        (lambda m: LOMO(m, loss_scale="auto"), "Invalid loss_scale"),
        (lambda m: LOMO(m, loss_scale=LossScaler(growth_factor=0.5)), "Invalid growth_factor"),
        (lambda m: LOMO([]), "empty parameter list"),
        (lambda m: InBackward(torch.optim.AdamW, m, lr=-1.0), "Invalid learning rate"),
        (lambda m: build_optimizer("adamw", m, betas=(1.5, 0.9)), "Invalid beta parameter"),
    ],
)
def test_bad_hyperparameters_name_the_culprit(factory, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        factory(tiny_llama())


def test_step_is_a_no_op_that_refuses_a_closure():
    model = tiny_llama()
    opt = AdaLomo(model)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="takes no closure"):
        opt.step(lambda: loss_of(model, batch(0)))


def test_zero_grad_discards_a_partial_accumulation():
    model = tiny_llama()
    opt = AdaLomo(model, accumulation_steps=2)
    opt.backward(loss_of(model, batch(0)))
    opt.zero_grad()
    assert not any("grad_acc" in st for st in opt.state.values())
    assert not opt.backward(loss_of(model, batch(1))).updated  # the count restarted


@pytest.mark.parametrize("name", list(optimizer_names()))
def test_every_named_optimizer_trains(name, device):
    if device.type == "cuda":
        # A GPU machine's own environment may lack an optional package (GaLore and APOLLO import
        # bitsandbytes); scripts/setup installs them all, so the CPU variant never skips.
        from leantune.optim.competitors import COMPETITORS

        if name in COMPETITORS:
            try:
                importlib.import_module(COMPETITORS[name].module)
            except ImportError as err:
                pytest.skip(f"{name} on cuda needs {COMPETITORS[name].package}: {err}")
    # Sophia differentiates the gradients again; CPU flash attention has no double backward.
    model = tiny_llama(attn="eager" if name == "sophia" else "sdpa", device=device)
    kwargs = {"lr": 1e-3}
    opt = build_optimizer(name, model, **kwargs)
    stepper = as_stepper(opt) if is_fused(name) else Stepper(opt, create_graph=name == "sophia")
    before = [p.detach().clone() for p in model.parameters()]
    for s in range(2):
        assert stepper.backward(loss_of(model, batch(s))).updated
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    if name == "badam":  # one block trains, the rest is frozen until the switch
        active = [p.requires_grad for p in model.parameters()]
        assert changed == active and 0 < sum(active) < len(before) // 2
    else:
        assert sum(changed) > len(before) // 2


def test_unknown_optimizer_lists_the_known_ones_and_suggests():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adamww'\. Did you mean 'adamw'\?.*adalomo"):
        build_optimizer("adamww", tiny_llama())
    with pytest.raises(ValueError, match="Unknown optimizer"):
        build_optimizer("adalomo_in_backward", tiny_llama())


def test_engine_options_for_ordinary_optimizers_go_to_the_stepper():
    with pytest.raises(ValueError, match="pass clip_grad_norm to leantune.optim.Stepper"):
        build_optimizer("adamw", tiny_llama(), clip_grad_norm=1.0)
    with pytest.raises(ValueError, match="unexpected keyword"):
        build_optimizer("adalomo", tiny_llama(), betas=(0.9, 0.99))


def test_stepper_accumulation_and_clipping_equal_native_torch(device):
    ref, ours = tiny_llama(device=device), tiny_llama(device=device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    stepper = Stepper(torch.optim.AdamW(ours.parameters(), lr=1e-2), accumulation_steps=2, clip_grad_norm=0.1)
    for s in range(3):
        b = batch(s, size=8)
        for half in (slice(0, 4), slice(4, 8)):
            (loss_of(ref, {k: v[half] for k, v in b.items()}) / 2).backward()
            stepper.backward(loss_of(ours, {k: v[half] for k, v in b.items()}))
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
        ref_opt.zero_grad()
    assert_models_close(ours, ref)


def test_stepper_skips_non_finite_gradients(device):
    model = tiny_llama(device=device)
    stepper = Stepper(torch.optim.AdamW(model.parameters(), lr=1e-2), clip_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    handle = model.lm_head.weight.register_hook(lambda g: g * float("nan"))
    result = stepper.backward(loss_of(model, batch(0)))
    handle.remove()
    assert result.skipped and not result.updated
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_fused_non_finite_gradient_with_clipping_is_skipped_in_fp32_too(device):
    model = tiny_llama(device=device)
    opt = LOMO(model, clip_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    handle = model.lm_head.weight.register_hook(lambda g: g * float("nan"))
    assert opt.backward(loss_of(model, batch(0))).skipped
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_named_parameters_and_param_groups_are_accepted():
    model = tiny_llama()
    ref = tiny_llama()
    head = [p for n, p in model.named_parameters() if "lm_head" in n]
    rest = [p for n, p in model.named_parameters() if "lm_head" not in n]
    opt = LOMO([{"params": rest}, {"params": head, "lr": 0.0}], lr=5e-2)
    opt.backward(loss_of(model, batch(0)))
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    named = LOMO(list(tiny_llama().named_parameters()), lr=1e-2)
    assert "param_names" in named.state_dict()["param_groups"][0]


def test_as_stepper_wraps_ordinary_optimizers_and_refuses_options_for_fused_ones():
    model = tiny_llama()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = as_stepper(sgd, clip_grad_norm=0.5, accumulation_steps=2)
    assert isinstance(stepper, Stepper) and stepper.optimizer is sgd
    assert stepper.clip_grad_norm == 0.5 and stepper.accumulation_steps == 2
    fused = LOMO(tiny_llama(), lr=0.1)
    assert as_stepper(fused) is fused
    with pytest.raises(
        TypeError, match=r"^pass clipping/accumulation options to the fused optimizer's constructor$"
    ):
        as_stepper(fused, clip_grad_norm=1.0)


@pytest.mark.parametrize("where", ["grad", "acc", "both"])
@pytest.mark.parametrize(
    "bad", [None, float("nan"), float("inf"), -float("inf")], ids=["finite", "nan", "inf", "-inf"]
)
def test_zero_unless_finite_zeroes_every_buffer_of_a_bad_gradient_and_nothing_else(where, bad, device):
    from leantune.optim.engine import GradientView

    g = torch.Generator().manual_seed(0)
    grad = torch.randn(12, 5, generator=g).to(device) if where != "acc" else None
    acc = torch.randn(12, 5, generator=g).to(device) if where != "grad" else None
    if bad is not None:
        (grad if grad is not None else acc)[11, 4] = bad  # in the last of several chunks
    before = [t.clone() for t in (grad, acc) if t is not None]
    flag = GradientView(grad, acc, inv_scale=0.5, clip_value=None, clip_coef=1.0).zero_unless_finite(10)
    assert flag.dtype == torch.bool and flag.shape == () and bool(flag) == (bad is not None)
    for t, b in zip([t for t in (grad, acc) if t is not None], before):
        if bad is None:
            assert torch.equal(t, b)  # untouched, bitwise
        else:
            assert torch.equal(t, torch.zeros_like(t))


# ----------------------------------------------------------------------------- the loss scaler
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_scale": 0.0}, "Invalid loss scale: 0.0 (must be > 0)"),
        ({"growth_factor": 1.0}, "Invalid growth_factor: 1.0 (must be > 1)"),
        ({"backoff_factor": 0.0}, "Invalid backoff_factor: 0.0 (must be in (0, 1))"),
        ({"backoff_factor": 1.0}, "Invalid backoff_factor: 1.0 (must be in (0, 1))"),
        ({"growth_interval": 0}, "Invalid growth_interval: 0 (must be >= 1)"),
        ({"min_scale": 0.0}, "Invalid min_scale: 0.0 (must be > 0)"),
    ],
)
def test_loss_scaler_refuses_bad_settings_at_their_bounds(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LossScaler(**kwargs)


def test_loss_scaler_accepts_the_tightest_good_settings():
    s = LossScaler(0.5, growth_factor=1.5, backoff_factor=0.99, growth_interval=1, min_scale=0.25)
    s.update(overflow=False)
    assert s.scale == 0.75  # growth_interval 1: grows after every clean step


def test_loss_scaler_defaults_grow_after_1000_clean_steps_and_floor_at_one():
    s = LossScaler()
    assert (s.scale, s.clean_steps, s.overflows) == (2.0**16, 0, 0)
    for _ in range(999):
        s.update(overflow=False)
    assert s.scale == 2.0**16 and s.clean_steps == 999
    s.update(overflow=False)
    assert s.scale == 2.0**17 and s.clean_steps == 0
    s.update(overflow=False)
    s.update(overflow=True)
    assert (s.scale, s.clean_steps, s.overflows) == (2.0**16, 0, 1)
    for _ in range(30):
        s.update(overflow=True)
    assert s.scale == 1.0 and s.overflows == 31  # never below min_scale


def test_loss_scaler_state_round_trips_every_field():
    a = LossScaler(8.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=7, min_scale=0.5)
    a.update(overflow=False)
    a.update(overflow=True)
    a.update(overflow=False)
    state = a.state_dict()
    assert state == {"scale": 2.0, "dynamic": True, "growth_factor": 3.0, "backoff_factor": 0.25,
                     "growth_interval": 7, "min_scale": 0.5, "clean_steps": 1, "overflows": 1}  # fmt: skip
    b = LossScaler(dynamic=False)
    b.load_state_dict(state)
    assert b.state_dict() == state and vars(b) == vars(a)
    static = LossScaler.from_spec(128)
    assert not static.dynamic and static.scale == 128.0
    static.update(overflow=True)
    assert static.scale == 128.0 and static.overflows == 0  # a static scale never moves


@pytest.mark.parametrize(
    ("name", "dtype", "rounding", "fp64_default"),
    [("adalomo", torch.float32, "nearest", False), ("adalomo", torch.bfloat16, "kahan", False),
     ("adalomo", torch.float32, "nearest", True), ("adamw_in_backward", torch.float32, None, False),
     ("adamw_in_backward", torch.bfloat16, "stochastic", False)],
    ids=["adalomo", "adalomo-bf16-kahan", "adalomo-fp64-default", "adamw-in-backward",
         "adamw-in-backward-bf16"],
)  # fmt: skip
def test_init_state_builds_what_the_first_update_starts_from(name, dtype, rounding, fp64_default, device):
    """init_state (for checkpoint loaders that need the state's structure): the same keys, types,
    shapes and dtypes as after a first update (fp32 statistics for bf16 weights, also when torch's
    default dtype is fp64), zero-valued, counters at 0, weights untouched, segments included; it
    never resets a state that exists."""
    before_default = torch.get_default_dtype()
    if fp64_default:
        torch.set_default_dtype(torch.float64)
    try:
        _check_init_state(name, dtype, rounding, device)
    finally:
        torch.set_default_dtype(before_default)


def _check_init_state(name, dtype, rounding, device):
    from leantune.optim import build_optimizer
    from leantune.optim.segments import Segment

    extra = {"rounding": rounding} if rounding else {}

    def make():
        model = tiny_llama(dtype=dtype, device=device)
        opt = build_optimizer(name, model, lr=1e-2, weight_decay=0.0, **extra)
        opt.set_segments({"model.layers.0.mlp.up_proj.weight": [Segment("a", rows=(range(0, 16),))]})
        return model, opt

    model, opt = make()
    before = [p.detach().clone() for p in model.parameters()]
    opt.init_state()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    ref_model, ref = make()
    ref.backward(loss_of(ref_model, batch(0)))
    assert len(opt.state) == len(ref.state) == sum(1 for p in model.parameters() if p.requires_grad)
    ref_params = dict(ref_model.named_parameters())
    for name_, p in model.named_parameters():
        st, want = opt.state[p], ref.state[ref_params[name_]]
        assert st.keys() == want.keys(), (name_, st.keys(), want.keys())
        for k, v in st.items():
            assert type(v) is type(want[k]), (k, type(v), type(want[k]))
            if torch.is_tensor(v):
                assert v.shape == want[k].shape and v.dtype == want[k].dtype, k
                assert not v.any(), k  # zero: what the first update starts from (counters too)
            elif isinstance(v, (int, float)):
                assert v == 0, k
    up = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert any("|" in k for k in opt.state[up])  # the segment's own state
    opt.backward(loss_of(model, batch(0)))
    trained = {
        id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in opt.state.items()
    }
    opt.init_state()
    for p, st in opt.state.items():
        assert all(torch.equal(v, trained[id(p)][k]) for k, v in st.items() if torch.is_tensor(v))


class _Recording(Collectives):
    """Identity collectives that record what each rank sends to the norm/flag reductions."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []

    def sum_square_norms(self, total: torch.Tensor) -> torch.Tensor:
        self.sent.append(total)
        return total


def test_a_rank_with_nothing_to_add_still_enters_the_reductions_with_a_device_tensor(device):
    # Another rank that has gradients enters these collectives; skipping one here would hang it,
    # and NCCL refuses a CPU tensor.
    model = tiny_llama(device=device)
    opt = LOMO(model, lr=1e-2, clip_grad_norm=1.0)
    opt.collectives = rec = _Recording()
    assert float(opt._global_square_sum()) == 0.0  # no square sums collected on this rank
    assert opt._any_zeroed() is False  # no tensor was checked on this rank
    assert len(rec.sent) == 2
    assert all(t.device == device and t.dtype == torch.float32 and t.dim() == 0 for t in rec.sent)
