"""FusedOptimizer.begin/end/abort_micro_batches in one process: backward passes run by another
driver (a pipeline schedule) accumulate and give one update, against plain torch and against the
optimizer's own accumulation; the misuse cases are errors that name what to do."""

from __future__ import annotations

import pytest
import torch

from leantune.optim import LOMO, AdaLomo


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def _loss(model, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _external(opt, model, batches, factor_check: float = 1.0):
    factor = opt.begin_micro_batches(len(batches))
    assert factor == factor_check
    for b in batches:
        (_loss(model, b) * factor).backward()  # what a schedule does: backward per micro-batch
    return opt.end_micro_batches()


def test_lomo_over_micro_batches_equals_sgd_on_the_mean_gradient():
    ours, ref = _model(), _model()
    opt = LOMO(ours, lr=0.1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        batches = _batches(3 + step)
        result = _external(opt, ours, batches)
        assert result.updated and not result.skipped
        sgd.zero_grad()
        (sum(_loss(ref, b) for b in batches) / len(batches)).backward()
        sgd.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adalomo_with_clipping_equals_its_own_accumulation():
    ours, ref = _model(), _model()
    opt = AdaLomo(ours, lr=0.05, clip_grad_norm=0.05)
    acc = AdaLomo(ref, lr=0.05, clip_grad_norm=0.05, accumulation_steps=4)
    for _ in range(3):
        batches = _batches(4)
        result = _external(opt, ours, batches)
        for b in batches:
            expected = acc.backward(_loss(ref, b))
        assert result.grad_norm == pytest.approx(expected.grad_norm, rel=1e-6) and result.grad_norm > 0.05
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_dynamic_loss_scaling_skips_an_overflowing_step_and_halves_the_scale():
    model = _model()
    opt = LOMO(model, lr=0.1, loss_scale="dynamic")
    before = [p.detach().clone() for p in model.parameters()]
    scale = opt.loss_scaler.scale
    factor = opt.begin_micro_batches(2)
    assert factor == scale
    (_loss(model, _batches(1)[0]) * factor).backward()
    (_loss(model, _batches(1)[0]) * float("inf")).backward()
    result = opt.end_micro_batches()
    assert result.skipped and not result.updated and opt.loss_scaler.scale == scale / 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert _external(opt, model, _batches(2), factor_check=scale / 2).updated  # and it goes on


def test_abort_drops_the_partial_accumulation():
    ours, ref = _model(), _model()
    opt, clean = LOMO(ours, lr=0.1), LOMO(ref, lr=0.1)
    opt.begin_micro_batches(2)
    (_loss(ours, _batches(1)[0]) * 100).backward()  # a micro-batch of a step that then fails
    opt.abort_micro_batches()
    assert all(p.grad is None for p in ours.parameters())
    _external(opt, ours, _batches(2))
    _external(clean, ref, _batches(2))
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_misuse_is_an_error_that_says_what_to_do():
    model = _model()
    opt = LOMO(model, lr=0.1, accumulation_steps=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"Invalid number of micro-batches"):
            opt.begin_micro_batches(bad)
    with pytest.raises(RuntimeError, match=r"end_micro_batches\(\) without begin_micro_batches\(\)"):
        opt.end_micro_batches()
    with pytest.raises(RuntimeError, match=r"abort_micro_batches\(\) without begin_micro_batches\(\)"):
        opt.abort_micro_batches()
    opt.backward(_loss(model, _batches(1)[0]))  # one of accumulation_steps=2: pending
    with pytest.raises(RuntimeError, match=r"1 opt.backward\(\) micro-batches of accumulation_steps=2"):
        opt.begin_micro_batches(2)
    opt.zero_grad()
    opt.begin_micro_batches(2)
    with pytest.raises(RuntimeError, match=r"inside a backward or an unfinished begin_micro_batches"):
        opt.begin_micro_batches(2)
    with pytest.raises(RuntimeError, match=r"none of its 4 trainable parameters received a gradient"):
        opt.end_micro_batches()
