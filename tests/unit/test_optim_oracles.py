"""The fused optimizers against independent references (torch / transformers optimizers)."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from leantune.optim import LOMO, AdaLomo, InBackward
from tests.helpers import batch, loss_of, tiny_llama

STEPS = 5


def assert_models_close(
    a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-5, atol: float = 1e-7
) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_models_differ(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def run_reference(model, opt, steps=STEPS, *, clip=None, pre_step=None, seeds=None):
    for s in seeds if seeds is not None else range(steps):
        loss_of(model, batch(s)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if pre_step is not None:
            pre_step()
        opt.step()
        opt.zero_grad()


def run_fused(model, opt, steps=STEPS, seeds=None):
    results = []
    for s in seeds if seeds is not None else range(steps):
        results.append(opt.backward(loss_of(model, batch(s))))
    return results


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lomo_equals_sgd_with_decoupled_weight_decay(weight_decay, device):
    lr = 5e-2
    ref, ours = tiny_llama(device=device), tiny_llama(device=device)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr)

    def decay():
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(1 - lr * weight_decay)

    run_reference(ref, sgd, pre_step=decay)
    start = tiny_llama(device=device)
    results = run_fused(ours, LOMO(ours, lr=lr, weight_decay=weight_decay))
    assert all(r.updated and not r.skipped and r.grad_norm is None for r in results)
    assert_models_close(ours, ref)
    assert_models_differ(ours, start)


def test_lomo_clip_grad_norm_equals_clip_grad_norm_then_sgd(device):
    lr, clip = 5e-2, 0.05  # small threshold so that clipping is active at every step
    ref, ours = tiny_llama(device=device), tiny_llama(device=device)
    norms = []
    sgd = torch.optim.SGD(ref.parameters(), lr=lr)
    for s in range(STEPS):
        loss_of(ref, batch(s)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)))
        sgd.step()
        sgd.zero_grad()
    results = run_fused(ours, LOMO(ours, lr=lr, clip_grad_norm=clip))
    assert all(n > clip for n in norms)
    for r, n in zip(results, norms):
        assert r.grad_norm == pytest.approx(n, rel=1e-5)
    assert_models_close(ours, ref)


def test_lomo_clip_grad_value_equals_clip_grad_value_then_sgd(device):
    lr, clip = 5e-2, 1e-3
    ref, ours = tiny_llama(device=device), tiny_llama(device=device)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr)
    for s in range(STEPS):
        loss_of(ref, batch(s)).backward()
        torch.nn.utils.clip_grad_value_(ref.parameters(), clip)
        sgd.step()
        sgd.zero_grad()
    run_fused(ours, LOMO(ours, lr=lr, clip_grad_value=clip))
    assert_models_close(ours, ref)


def adafactor_oracle(params, lr, weight_decay):
    return Adafactor(
        params,
        lr=lr,
        beta1=None,
        scale_parameter=True,
        relative_step=False,
        warmup_init=False,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        decay_rate=-0.8,
        weight_decay=weight_decay,
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("chunk_elements", [None, 64])
def test_adalomo_equals_transformers_adafactor(weight_decay, chunk_elements, device):
    lr = 1e-2
    ref, ours = tiny_llama(device=device), tiny_llama(device=device)
    run_reference(ref, adafactor_oracle(ref.parameters(), lr, weight_decay), steps=6)
    opt = AdaLomo(ours, lr=lr, weight_decay=weight_decay)
    if chunk_elements is not None:
        opt.chunk_elements = chunk_elements  # forces many row chunks per matrix
    run_fused(ours, opt, steps=6)
    assert_models_close(ours, ref)
    # Both kinds of tensor were exercised: factored matrices and unfactored vectors.
    kinds = {tuple(sorted(k for k in st if k != "step")) for st in opt.state.values()}
    assert kinds == {("col", "row"), ("v",)}
    assert all(st["step"] == 6 for st in opt.state.values())


def paper_adalomo_update(p: torch.Tensor, g: torch.Tensor, st: dict, lr: float, wd: float) -> None:
    """AdaLomo's update of one tensor as the paper writes it (arXiv 2310.10195; the formulas of
    ../shared/reference/algorithms.md), in plain fp64 tensor arithmetic: an oracle independent of
    both leantune's chunked kernel and transformers' Adafactor."""
    p64, g64 = p.detach().double(), g.double()
    t = st["t"] = st.get("t", 0) + 1
    rho = 1 - t**-0.8
    G = g64 * g64 + 1e-30  # noqa: N806 (the paper's name)
    if g64.dim() >= 2:
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=g.device)  # noqa: E731
        r = st["r"] = rho * st.get("r", zeros(G.shape[0])) + (1 - rho) * G.mean(1)
        c = st["c"] = rho * st.get("c", zeros(G.shape[1])) + (1 - rho) * G.mean(0)
        u = g64 / torch.sqrt(torch.outer(r / r.mean(), c))
    else:
        v = st["v"] = rho * st.get("v", torch.zeros_like(G)) + (1 - rho) * G
        u = g64 / torch.sqrt(v)
    rms = lambda x: x.pow(2).mean().sqrt().item()  # noqa: E731
    u = u / max(1.0, rms(u) / 1.0)
    eta = lr * max(1e-3, rms(p64))
    with torch.no_grad():
        p.copy_((p64 * (1 - eta * wd) - eta * u).to(p.dtype))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_adalomo_equals_the_papers_update_with_accumulation_clipping_and_decay(tie, device):
    """A second guard for AdaLomo's math, on the paths the Adafactor oracle does not take: two
    accumulated half-batches, global-norm clipping of their mean (active at every step), decoupled
    weight decay, and (tied) an embedding shared with the head, updated once with its summed
    gradient."""
    lr, wd, clip = 1e-2, 0.1, 0.05
    ref, ours = tiny_llama(tie=tie, device=device), tiny_llama(tie=tie, device=device)
    opt = AdaLomo(ours, lr=lr, weight_decay=wd, clip_grad_norm=clip, accumulation_steps=2)
    states: dict[int, dict] = {}
    norms = []
    for s in range(4):
        b = batch(s, size=8)
        halves = [{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}]
        for half in halves:
            (loss_of(ref, half) / 2).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)))
        for p in ref.parameters():  # parameters() yields a tied tensor once
            paper_adalomo_update(p, p.grad, states.setdefault(id(p), {}), lr, wd)
            p.grad = None
        opt.backward(loss_of(ours, halves[0]))
        result = opt.backward(loss_of(ours, halves[1]))
        assert result.updated and result.grad_norm == pytest.approx(norms[-1], rel=1e-5)
    assert all(n > clip for n in norms)
    assert_models_close(ours, ref)
    assert_models_differ(ours, tiny_llama(tie=tie, device=device))
    assert len(opt.state) == len(states)  # one state per tensor, the tied one once


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_bf16_weights_take_the_fp64_oracle_update_rounded_to_nearest(name, device):
    """bf16 weights and gradients: each step is the oracle's update, computed in fp64 from the same
    bf16 gradient and rounded to the nearest bf16. The fused kernels compute in fp32, so a result
    may land one bf16 step away where fp32 and fp64 round differently; nearly all are equal."""
    lr, wd = 1e-2, 0.1
    ref, ours = (tiny_llama(dtype=torch.bfloat16, device=device) for _ in range(2))
    opt = (LOMO if name == "lomo" else AdaLomo)(ours, lr=lr, weight_decay=wd)
    states: dict[int, dict] = {}
    for s in range(3):
        loss_of(ref, batch(s)).backward()
        for p in ref.parameters():
            if name == "lomo":
                with torch.no_grad():
                    p.copy_((p.double() * (1 - lr * wd) - lr * p.grad.double()).to(p.dtype))
            else:
                paper_adalomo_update(p, p.grad, states.setdefault(id(p), {}), lr, wd)
            p.grad = None
        opt.backward(loss_of(ours, batch(s)))
    same = total = 0
    for (n, pa), pb in zip(ours.named_parameters(), ref.parameters()):
        assert pa.dtype == torch.bfloat16
        torch.testing.assert_close(pa, pb, rtol=2**-7, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        same += int((pa == pb).sum())
        total += pa.numel()
    assert same / total > 0.99
    assert_models_differ(ours, tiny_llama(dtype=torch.bfloat16, device=device))


def test_adalomo_state_is_small_and_fp32(device):
    model = tiny_llama(device=device)
    opt = AdaLomo(model)
    run_fused(model, opt, steps=1)
    n_state = sum(t.numel() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    n_matrix = sum(p.shape[0] + p.shape[1] for p in model.parameters() if p.dim() == 2)
    n_vector = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert n_state == n_matrix + n_vector
    assert all(
        t.dtype == torch.float32 for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )


@pytest.mark.parametrize(
    "make_ref",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
    ids=["adamw", "adafactor", "sgd-momentum"],
)
def test_in_backward_equals_the_wrapped_optimizer(make_ref, device):
    ref, ours = tiny_llama(device=device), tiny_llama(device=device)
    ref_opt = make_ref(list(ref.parameters()))
    run_reference(ref, ref_opt)
    kwargs = {k: v for k, v in ref_opt.defaults.items() if k in ("lr", "weight_decay", "momentum")}
    opt = InBackward(type(ref_opt), ours, **kwargs)
    run_fused(ours, opt)
    assert_models_close(ours, ref)


def test_in_backward_with_clipping_equals_clip_then_adamw(device):
    ref, ours = tiny_llama(device=device), tiny_llama(device=device)
    run_reference(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), clip=0.05)
    run_fused(ours, InBackward(torch.optim.AdamW, ours, lr=1e-2, clip_grad_norm=0.05))
    assert_models_close(ours, ref)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: LOMO(m, lr=5e-2, accumulation_steps=2),
        lambda m: LOMO(m, lr=5e-2, accumulation_steps=2, clip_grad_norm=0.05),
        lambda m: AdaLomo(m, lr=1e-2, accumulation_steps=2),
        lambda m: AdaLomo(m, lr=1e-2, accumulation_steps=2, clip_grad_norm=0.05),
    ],
    ids=["lomo", "lomo-clip", "adalomo", "adalomo-clip"],
)
def test_accumulation_of_two_half_batches_equals_one_full_batch(make_opt, device):
    full_model, acc_model = tiny_llama(device=device), tiny_llama(device=device)
    full_opt = make_opt(full_model)
    full_opt.accumulation_steps = 1
    acc_opt = make_opt(acc_model)
    for s in range(3):
        b = batch(s, size=8)
        full_opt.backward(loss_of(full_model, b))
        halves = [{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}]
        first = acc_opt.backward(loss_of(acc_model, halves[0]))
        assert not first.updated
        second = acc_opt.backward(loss_of(acc_model, halves[1]))
        assert second.updated
    assert_models_close(acc_model, full_model)


def test_in_backward_accumulation_equals_native_accumulation_then_adamw(device):
    # Adam divides by sqrt(v), which magnifies the rounding difference between a full-batch mean
    # and the mean of two half-batch means for near-zero gradients; the exact oracle for
    # accumulation is therefore AdamW with PyTorch's own accumulation over the same halves.
    ref, ours = tiny_llama(device=device), tiny_llama(device=device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = InBackward(torch.optim.AdamW, ours, lr=1e-2, accumulation_steps=2)
    for s in range(3):
        b = batch(s, size=8)
        for half in (slice(0, 4), slice(4, 8)):
            (loss_of(ref, {k: v[half] for k, v in b.items()}) / 2).backward()
            opt.backward(loss_of(ours, {k: v[half] for k, v in b.items()}))
        ref_opt.step()
        ref_opt.zero_grad()
    assert_models_close(ours, ref)


def test_accumulation_does_not_update_before_the_last_micro_batch(device):
    model = tiny_llama(device=device)
    before = [p.detach().clone() for p in model.parameters()]
    opt = AdaLomo(model, accumulation_steps=3)
    opt.backward(loss_of(model, batch(0)))
    opt.backward(loss_of(model, batch(1)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert opt.backward(loss_of(model, batch(2))).updated
    assert_models_differ(model, tiny_llama(device=device))
    assert not any("grad_acc" in st for st in opt.state.values())


def test_tied_weights_are_updated_once_with_the_summed_gradient(device):
    ref, ours = tiny_llama(tie=True, device=device), tiny_llama(tie=True, device=device)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    run_reference(ref, torch.optim.SGD(ref.parameters(), lr=5e-2))
    calls = []
    opt = LOMO(ours, lr=5e-2)
    original = opt._update
    opt._update = lambda t, *a: (calls.append(t.key), original(t, *a))
    run_fused(ours, opt, steps=STEPS)
    assert_models_close(ours, ref)
    tied = ours.lm_head.weight
    assert sum(p is tied for p in calls) == STEPS


def test_activation_checkpointing_gives_the_same_result(device):
    plain, ckpt = tiny_llama(device=device), tiny_llama(device=device)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    plain.train()
    for make in (lambda m: AdaLomo(m, lr=1e-2, clip_grad_norm=0.5), lambda m: LOMO(m, lr=1e-2)):
        o1, o2 = make(plain), make(ckpt)
        run_fused(plain, o1, steps=3)
        run_fused(ckpt, o2, steps=3)
        assert_models_close(ckpt, plain)
        o1.remove_hooks()
        o2.remove_hooks()
