"""FusedOptimizer.begin/end/abort_micro_batches in one process: backward passes run by another
driver (a pipeline schedule) accumulate and give one update, against plain torch and against the
optimizer's own accumulation; the misuse cases are errors that name what to do."""

from __future__ import annotations

import pytest
import torch

from leantune.optim import LOMO, AdaLomo, BackwardResult, LossScaler, Segment
from tests.threaded import run_ranks
from tests.unit.test_optim_mutants_engine import MULTI_RANK_MESSAGE


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


# ------------------------------------------------------------- survivors of mutmut (micro-batches)
def _sgd_on_the_mean(model, batches, lr: float = 0.1) -> None:
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    sgd.zero_grad()
    (sum(_loss(model, b) for b in batches) / len(batches)).backward()
    sgd.step()


def test_one_micro_batch_is_accepted_and_is_sgd_on_that_batch():
    ours, ref = _model(), _model()
    opt = LOMO(ours, lr=0.1)
    batches = _batches(1)
    result = _external(opt, ours, batches)
    assert result == BackwardResult(updated=True)
    _sgd_on_the_mean(ref, batches)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_invalid_micro_batch_counts_are_refused_with_the_whole_message():
    opt = LOMO(_model(), lr=0.1)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(
            ValueError, match=rf"^Invalid number of micro-batches: {bad!r} \(must be an int >= 1\)$"
        ):
            opt.begin_micro_batches(bad)


def test_misuse_messages_are_exactly_what_to_do():
    opt = LOMO(_model(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"^end_micro_batches\(\) without begin_micro_batches\(\)$"):
        opt.end_micro_batches()
    with pytest.raises(RuntimeError, match=r"^abort_micro_batches\(\) without begin_micro_batches\(\)$"):
        opt.abort_micro_batches()
    opt.begin_micro_batches(2)
    nested = r"^begin_micro_batches\(\) inside a backward or an unfinished begin_micro_batches\(\)$"
    with pytest.raises(RuntimeError, match=nested):
        opt.begin_micro_batches(2)
    opt.abort_micro_batches()


def test_no_gradient_between_begin_and_end_names_the_optimizer_class():
    opt = AdaLomo(_model(), lr=0.1)
    opt.begin_micro_batches(2)
    message = (
        r"^AdaLomo: none of its 4 trainable parameters received a gradient between "
        r"begin_micro_batches\(\) and end_micro_batches\(\)$"
    )
    with pytest.raises(RuntimeError, match=message):
        opt.end_micro_batches()


def test_a_static_loss_scale_is_the_factor_and_is_reported_in_the_result():
    ours, ref = _model(), _model()
    opt = LOMO(ours, lr=0.1, loss_scale=1024.0)
    batches = _batches(3)
    result = _external(opt, ours, batches, factor_check=1024.0)
    assert result == BackwardResult(updated=True, loss_scale=1024.0)
    assert result.zeroed is False and opt.loss_scaler.scale == 1024.0
    _sgd_on_the_mean(ref, batches)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_dynamic_scale_grows_after_growth_interval_clean_steps_and_backs_off_on_overflow():
    model = _model()
    scaler = LossScaler(2.0**10, growth_interval=2)
    opt = LOMO(model, lr=0.1, loss_scale=scaler)
    first = _external(opt, model, _batches(2), factor_check=2.0**10)
    assert first.updated and not first.skipped and first.zeroed is False
    assert first.loss_scale == 2.0**10 and first.grad_norm > 0 and scaler.scale == 2.0**10
    second = _external(opt, model, _batches(2), factor_check=2.0**10)
    assert second.updated and second.loss_scale == 2.0**10
    assert scaler.scale == 2.0**11  # grew after growth_interval=2 clean steps
    before = [p.detach().clone() for p in model.parameters()]
    factor = opt.begin_micro_batches(2)
    assert factor == 2.0**11
    (_loss(model, _batches(1)[0]) * factor).backward()
    (_loss(model, _batches(1)[0]) * float("inf")).backward()
    result = opt.end_micro_batches()
    assert result.skipped and not result.updated
    assert result.loss_scale == 2.0**11  # the scale this step used, before backing off
    assert scaler.scale == 2.0**10 and scaler.overflows == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _RecordingScaler(LossScaler):
    """A dynamic scaler that records each outcome it is told (a bool: did the step overflow)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.told = []

    def update(self, overflow: bool) -> None:
        self.told.append(overflow)
        super().update(overflow)


def test_the_scaler_is_told_each_micro_batch_step_s_outcome_as_a_bool():
    model = _model()
    scaler = _RecordingScaler(8.0)
    opt = LOMO(model, lr=0.1, loss_scale=scaler)
    for _ in range(2):
        assert _external(opt, model, _batches(2), factor_check=8.0).updated
    assert scaler.told == [False, False] and all(type(t) is bool for t in scaler.told)
    assert scaler.clean_steps == 2 and scaler.overflows == 0 and scaler.scale == 8.0


def test_clipping_reports_the_total_norm_of_clip_grad_norm_and_clips_like_it():
    ours, ref = _model(), _model()
    opt = LOMO(ours, lr=0.1, clip_grad_norm=0.05)
    batches = _batches(3)
    result = _external(opt, ours, batches)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    (sum(_loss(ref, b) for b in batches) / len(batches)).backward()
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    sgd.step()
    assert result.updated and result.zeroed is False and result.loss_scale is None
    assert result.grad_norm == pytest.approx(float(total), rel=1e-5) and result.grad_norm > 0.05
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_without_measuring_leaves_its_parameter_and_flags_the_step():
    """No clipping, no dynamic scaling: the parameter whose accumulated gradient holds an inf is
    not updated (CPU), the others are, and the result says zeroed=True; the next backward is clean."""
    ours, ref = _model(), _model()
    opt = LOMO(ours, lr=0.1)
    batches = _batches(2)
    bad = ours[2].weight
    kept = bad.detach().clone()
    handle = bad.register_hook(lambda g: g * float("inf"))
    result = _external(opt, ours, batches)
    handle.remove()
    assert result == BackwardResult(updated=True, zeroed=True)
    assert torch.equal(bad, kept)
    _sgd_on_the_mean(ref, batches)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if name != "2.weight":
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(torch.isfinite(p).all() for p in ours.parameters())
    # a plain opt.backward afterwards works, updates, and is not flagged
    again = opt.backward(_loss(ours, _batches(1)[0]))
    assert again == BackwardResult(updated=True)
    assert not torch.equal(bad, kept)


def test_segments_are_updated_on_their_own_over_micro_batches():
    ours, ref = _model(), _model()
    opt = LOMO(ours, lr=0.1)
    opt.set_segments({ours[0].weight: [Segment("a", rows=(range(1, 3),), cols=(range(0, 6, 2),))]})
    frozen = ours[0].weight.detach().clone()
    batches = _batches(3)
    assert _external(opt, ours, batches).updated
    _sgd_on_the_mean(ref, batches)
    rows, cols = torch.tensor([1, 2]), torch.tensor([0, 2, 4])
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[rows[:, None], cols] = True
    torch.testing.assert_close(ours[0].weight[mask], ref[0].weight[mask], rtol=1e-6, atol=1e-7)
    assert torch.equal(ours[0].weight[~mask], frozen[~mask])
    for p, q in list(zip(ours.parameters(), ref.parameters()))[1:]:
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adalomo_segment_state_over_micro_batches_equals_its_own_accumulation():
    ours, ref = _model(), _model()
    segs = [Segment("q", rows=(range(0, 2),)), Segment("v", rows=(range(3, 5),))]
    opt = AdaLomo(ours, lr=0.05)
    acc = AdaLomo(ref, lr=0.05, accumulation_steps=2)
    opt.set_segments({ours[0].weight: segs})
    acc.set_segments({ref[0].weight: segs})
    for _ in range(2):
        batches = _batches(2)
        _external(opt, ours, batches)
        for b in batches:
            acc.backward(_loss(ref, b))
    assert {k for k in opt.state[ours[0].weight] if isinstance(k, str)} == {
        k for k in acc.state[ref[0].weight] if isinstance(k, str)
    }
    assert any(k.startswith("q|") for k in opt.state[ours[0].weight])
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_plain_parameters_on_two_ranks_are_refused_at_begin_micro_batches():
    def rank_fn(rank):
        opt = LOMO(_model(), lr=0.1)
        with pytest.raises(RuntimeError) as err:
            opt.begin_micro_batches(2)
        return str(err.value)

    assert run_ranks(2, rank_fn) == [MULTI_RANK_MESSAGE] * 2


def test_local_collectives_on_two_ranks_train_each_rank_over_micro_batches():
    def rank_fn(rank):
        model = _model(seed=rank)
        opt = LOMO(model, lr=0.1, collectives="local")
        return _external(opt, model, _batches(2)).updated

    assert run_ranks(2, rank_fn) == [True, True]
