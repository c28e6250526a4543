"""Unit contracts of leantune.optim's small pieces, each against an independent oracle: the Stepper
against plain torch loops, stochastic rounding against exact counts and a bit-level reimplementation,
segment index maths against brute force, the factory against the classes it should build."""

from __future__ import annotations

import copy
import math
import re
import struct
import warnings
from fractions import Fraction

import pytest
import torch

from leantune.optim import LOMO, AdaLomo, LossScaler, Stepper, build_optimizer, optimizer_names
from leantune.optim.factory import is_elementwise, needs_create_graph
from leantune.optim.precision import NoiseTable, stochastic_round
from leantune.optim.segments import LocalSegment, Segment, check_segments, index_tensor
from tests.unit.test_rounding import ulp_above
from tests.unit.test_segments import _Sharded


# ------------------------------------------------------------------------------------------ Stepper
def _linear(seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).to(device)  # initialised on the CPU: the same weights on every device


def _loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    # drawn on the CPU (the same data on every device), computed on the model's device
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    device = model.weight.device
    return torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))


@pytest.mark.parametrize(
    ("loss_scale", "accumulation"), [(None, 1), (None, 3), (2.0, 1), (1024.0, 2)], ids=str
)
def test_stepper_equals_a_plain_sgd_loop_and_reports_scale_and_norm(loss_scale, accumulation, device):
    ref, ours = _linear(device=device), _linear(device=device)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    stepper = Stepper(
        torch.optim.SGD(ours.parameters(), lr=0.1), loss_scale=loss_scale, accumulation_steps=accumulation
    )
    for step in range(2):
        for micro in range(accumulation):
            seed = step * accumulation + micro
            (_loss(ref, seed) / accumulation).backward()
            result = stepper.backward(_loss(ours, seed))
            # the scale used is reported on every call, accumulating or not
            assert result.loss_scale == loss_scale
            if micro < accumulation - 1:
                assert result.updated is False and not result.skipped
        norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in ref.parameters()))
        ref_opt.step()
        ref_opt.zero_grad()
        assert result.updated is True and not result.skipped
        assert result.grad_norm == pytest.approx(norm, rel=1e-5)
        # gradients are freed after a step, not kept as zero tensors
        assert all(p.grad is None for p in ours.parameters())
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_stepper_clip_grad_value_equals_torch_clip_then_sgd(device):
    ref, ours = _linear(device=device), _linear(device=device)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    stepper = Stepper(torch.optim.SGD(ours.parameters(), lr=0.1), clip_grad_value=0.05)
    for seed in range(3):
        _loss(ref, seed).backward()
        assert max(float(p.grad.abs().max()) for p in ref.parameters()) > 0.05  # clipping bites
        torch.nn.utils.clip_grad_value_(ref.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        assert stepper.backward(_loss(ours, seed)).updated
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_stepper_dynamic_scale_backs_off_on_fp16_overflow_then_steps_and_grows(device):
    # fp16 weights, fp32 loss: the scaled gradient 4 * scale is inf in fp16 until scale <= 8192.
    w = torch.nn.Parameter(torch.full((3,), 0.5, dtype=torch.float16, device=device))
    scaler = LossScaler(init_scale=2.0**16, growth_interval=1)
    stepper = Stepper(torch.optim.SGD([w], lr=0.0625), loss_scale=scaler)
    for scale in (2.0**16, 2.0**15, 2.0**14):
        result = stepper.backward((w.float() * 4.0).sum())
        assert result.skipped and result.updated is False and result.loss_scale == scale
        assert math.isinf(result.grad_norm) and torch.equal(w.detach(), torch.full_like(w, 0.5))
        assert scaler.scale == scale / 2 and w.grad is None
    result = stepper.backward((w.float() * 4.0).sum())
    assert result.updated and not result.skipped and result.loss_scale == 2.0**13
    assert result.grad_norm == pytest.approx(4.0 * math.sqrt(3), rel=1e-3)  # an fp16 norm
    assert torch.equal(w.detach(), torch.full_like(w, 0.25))  # unscaled exactly: 0.5 - 0.0625 * 4
    assert scaler.scale == 2.0**14 and scaler.overflows == 3  # one clean step grows it back


def test_stepper_without_loss_scaling_applies_a_large_but_finite_fp16_gradient(device):
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.float16, device=device))
    stepper = Stepper(torch.optim.SGD([w], lr=2.0**-16))
    result = stepper.backward((w.float() * 40000.0).sum())  # 40000 fits fp16 (max 65504), 2x would not
    assert result.updated and not result.skipped and result.loss_scale is None
    assert result.grad_norm == 40000.0
    assert float(w.detach()) == pytest.approx(1 - 40000 / 65536, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"clip_grad_norm": 0.0}, ValueError, r"Invalid clip_grad_norm: 0.0 (must be > 0 or None)"),
        ({"clip_grad_norm": -1}, ValueError, r"Invalid clip_grad_norm: -1 (must be > 0 or None)"),
        ({"clip_grad_value": 0}, ValueError, r"Invalid clip_grad_value: 0 (must be > 0 or None)"),
        ({"accumulation_steps": 0}, ValueError, "Invalid accumulation_steps: 0 (must be an int >= 1)"),
        ({"accumulation_steps": True}, ValueError, "Invalid accumulation_steps: True (must be an int >= 1)"),
        ({"accumulation_steps": 1.5}, ValueError, "Invalid accumulation_steps: 1.5 (must be an int >= 1)"),
    ],
    ids=str,
)
def test_stepper_refuses_bad_options_naming_them(kwargs, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        Stepper(torch.optim.SGD(_linear().parameters(), lr=0.1), **kwargs)


def test_stepper_accepts_the_smallest_good_options_and_refuses_fused_optimizers():
    Stepper(torch.optim.SGD(_linear().parameters(), lr=0.1), clip_grad_norm=1e-12, clip_grad_value=1e-12)
    with pytest.raises(TypeError, match=r"^fused optimizers already have \.backward\(\); use them directly$"):
        Stepper(LOMO(_linear(), lr=0.1))


def test_stepper_refuses_a_non_scalar_loss_with_its_shape():
    model = _linear()
    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"^loss must be a scalar, got shape \(5, 3\)$"):
        stepper.backward(model(torch.randn(5, 4)))


def test_stepper_silences_only_the_create_graph_warning():
    model = _linear()
    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=0.1), create_graph=True)

    def hook(grad):
        warnings.warn("user hook ran", UserWarning, stacklevel=1)

    model.weight.register_hook(hook)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert stepper.backward(_loss(model, 0)).updated
    # torch's reference-cycle warning is expected (zero_grad breaks the cycle); the user's is not ours
    assert [str(w.message) for w in caught] == ["user hook ran"]


def test_stepper_zero_grad_frees_gradients_and_restarts_the_accumulation():
    model = _linear()
    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2)
    assert not stepper.backward(_loss(model, 0)).updated
    stepper.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert not stepper.backward(_loss(model, 1)).updated  # the count restarted
    assert stepper.backward(_loss(model, 2)).updated


def test_stepper_state_dict_round_trip_resumes_identically_with_the_scaler(device):
    a, b = _linear(device=device), _linear(device=device)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    stepper = Stepper(opt_a, loss_scale=LossScaler(init_scale=8.0, growth_interval=2), accumulation_steps=2)
    for seed in range(3):  # one step, then half of the next
        stepper.backward(_loss(a, seed))
    state = copy.deepcopy(stepper.state_dict())
    assert state["micro_step"] == 1 and state["loss_scaler"]["clean_steps"] == 1
    # a stepper built without loss scaling gets the saved scaler back
    resumed = Stepper(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), accumulation_steps=2)
    resumed.load_state_dict(state)
    assert resumed.engine_state_dict() == stepper.engine_state_dict()
    assert resumed.loss_scaler.scale == 8.0 and resumed.loss_scaler.dynamic
    # resume at a step boundary: same weights, same scale afterwards
    b.load_state_dict(a.state_dict())
    stepper.zero_grad()
    resumed.zero_grad()
    for seed in range(3, 7):
        assert stepper.backward(_loss(a, seed)) == resumed.backward(_loss(b, seed))
    assert resumed.loss_scaler.scale == stepper.loss_scaler.scale == 16.0
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_a_loss_scaler_shows_its_kind_and_current_scale():
    assert repr(LossScaler(init_scale=2.0**16)) == "LossScaler(dynamic, scale=65536)"
    assert repr(LossScaler(init_scale=0.5, dynamic=False)) == "LossScaler(static, scale=0.5)"


def test_stepper_load_keeps_updating_the_scaler_object_it_was_given():
    # Callers that log or share their LossScaler must keep seeing the live one after a resume.
    scaler = LossScaler(init_scale=4.0)
    model = _linear()
    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=0.1), loss_scale=scaler)
    saved = {
        "optimizer": stepper.optimizer.state_dict(),
        "micro_step": 0,
        "loss_scaler": LossScaler(init_scale=32.0).state_dict(),
    }
    stepper.load_state_dict(saved)
    assert stepper.loss_scaler is scaler and scaler.scale == 32.0


# -------------------------------------------------------------------------------- stochastic rounding
def _bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def test_bf16_stochastic_round_is_the_bit_trick_on_randint_draws_of_the_generator(device):
    values = [1.0 + 2.0**-10, -3.3, 0.1, 2.0 - 2.0**-20, -(2.0**-130), 1e30, 7.0, 0.0, math.inf]
    x = torch.tensor(values * 8, dtype=torch.float32, device=device)
    # the draws of a generator on the device (its own stream: CUDA's differs from the CPU's)
    noise = torch.randint(
        0,
        1 << 16,
        (x.numel(),),
        dtype=torch.int32,
        device=device,
        generator=torch.Generator(device=device).manual_seed(5),
    ).tolist()
    # Add 16 noise bits to the fp32 pattern and keep its top half (a carry moves to the next bf16).
    want = [_float((_bits(v) + k) & 0xFFFF0000) for v, k in zip(x.tolist(), noise)]
    got = stochastic_round(x.clone(), torch.bfloat16, torch.Generator(device=device).manual_seed(5))
    assert got.dtype == torch.bfloat16 and got.float().tolist() == want


def test_fp16_stochastic_round_of_one_generator_seed_is_reproducible_and_varies_with_it(device):
    x = torch.full((256,), 1.0 + 2.0**-12, device=device)  # a quarter of an fp16 ulp above 1

    def gen(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    a = stochastic_round(x.clone(), torch.float16, gen(3))
    b = stochastic_round(x.clone(), torch.float16, gen(3))
    c = stochastic_round(x.clone(), torch.float16, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the noise comes from the generator only, not from the global RNG (manual_seed seeds CUDA's too)
    torch.manual_seed(0)
    d = stochastic_round(x.clone(), torch.float16, gen(3))
    torch.manual_seed(1)
    e = stochastic_round(x.clone(), torch.float16, gen(3))
    assert torch.equal(d, a) and torch.equal(e, a)


def _fp16_cases():
    tiny = 2.0**-24  # the smallest fp16 subnormal; the fp32 input resolves it far more finely
    return [
        1.0 + 2.0**-12,  # P(up) = 1/4
        1.0 + 3 * 2.0**-12,  # nearest is the upper neighbour, P(down) = 1/4
        -(2.0 + 5 * 2.0**-13),  # P = 5/16, negative
        1.0 + 2.0**-11,  # a tie
        tiny * (1 + 0.25 + 3 * 2.0**-19),  # 65536 P = 16384.375: off the noise grid
        tiny * (2 + 0.5 - 2.0**-17),  # 65536 P = 32767.5 - ...
    ]


@pytest.mark.parametrize("value", _fp16_cases())
def test_fp16_over_all_noise_values_the_round_up_count_is_the_nearest_to_its_probability(value, device):
    x = torch.full((1 << 16,), value, dtype=torch.float32, device=device)
    lo, hi = ulp_above(x[:1], torch.float16)
    lo, hi = float(lo), float(hi)
    every = torch.arange(1 << 16, dtype=torch.int32, device=device)
    r = stochastic_round(x.clone(), torch.float16, noise=lambda n: every[:n]).float()
    assert set(r.tolist()) <= {lo, hi}
    # E[r] = x needs P(hi) = (x - lo) / (hi - lo); with 2^16 noise values the count of hi can be
    # exact when 2^16 P is an integer and is within 1/2 of it otherwise.
    p_hi = (Fraction(value) - Fraction(lo)) / (Fraction(hi) - Fraction(lo))
    ups = int((r == hi).sum())
    assert abs(ups - p_hi * (1 << 16)) <= Fraction(1, 2)


def test_fp16_stochastic_round_of_more_than_one_noise_draw_uses_every_piece(device):
    # The optimizers' noise table refuses draws over MAX_DRAW: longer tensors take several draws.
    n = NoiseTable.MAX_DRAW + 3
    table = NoiseTable(0, device, torch.Generator(device=device).manual_seed(0))
    x = torch.full((n,), 1.0 + 2.0**-12, device=device)
    r = stochastic_round(x, torch.float16, noise=table).float()
    assert r.shape == (n,) and bool(((r == 1.0) | (r == 1.0 + 2.0**-10)).all())
    assert abs(float((r > 1.0).double().mean()) - 0.25) < 2e-3


# ------------------------------------------------------------------------------ segment index maths
def test_index_tensor_is_built_on_the_requested_device():
    for index in [(), (range(0, 3), range(5, 9, 2))]:
        t = index_tensor(index, "meta")
        assert t.device.type == "meta" and t.dtype == torch.long and t.shape == (sum(map(len, index)),)


def _brute(param2d: torch.Tensor, rows, cols) -> torch.Tensor:
    rows = [i for r in rows for i in r] if rows is not None else range(param2d.shape[0])
    cols = [j for r in cols for j in r] if cols is not None else range(param2d.shape[1])
    return torch.tensor([[float(param2d[i, j]) for j in cols] for i in rows])


@pytest.mark.parametrize(
    ("shape", "rows", "cols"),
    [
        ((12, 10), (range(0, 2), range(5, 11, 3)), (range(1, 3), range(6, 10, 2))),  # both gathered
        ((12, 10), (range(4, 5),), (range(0, 2), range(7, 8))),  # one row, several column runs
        ((2, 5, 3), None, (range(0, 2),)),  # a 3-D tensor: its (10, 3) view
        ((2, 5, 3), (range(3, 8),), None),  # rows of that view, in place
        ((4, 2, 6), (range(1, 8, 3),), (range(2, 6),)),
    ],
    ids=str,
)
def test_local_segment_reads_and_writes_exactly_its_cells(shape, rows, cols):
    p = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    view = p.view(-1, shape[-1])
    seg = LocalSegment(Segment("s", rows=rows, cols=cols), p)
    want = _brute(view, rows, cols)
    part = seg.read(p)
    assert part.shape == want.shape and torch.equal(part, want)
    part.neg_().sub_(1)  # every read cell becomes negative
    seg.write(p, part)
    assert torch.equal(_brute(view, rows, cols), -want - 1)
    assert int((p < 0).sum()) == want.numel()  # and nothing else was written
    again = seg.read(p)  # a second read reuses the cached indices
    assert torch.equal(again, -want - 1)


def test_a_vector_segment_without_rows_is_the_whole_vector():
    v = torch.arange(7, dtype=torch.float32)
    seg = Segment("all")
    assert seg.shape((7,)) == torch.Size([7])
    local = LocalSegment(seg, v)
    assert torch.equal(local.read(v), v) and local.n_rows == 7


def test_a_rank_without_rows_of_the_segment_reads_an_empty_part_and_writes_nothing():
    # (2, 4) over 4 ranks: ranks 2 and 3 hold no rows (FSDP2 shards as torch.chunk does)
    for seg in (Segment("c", cols=(range(1, 3),)), Segment("r", rows=(range(0, 2),))):
        local = LocalSegment(seg, _Sharded((2, 4), 3, 4))
        shard = torch.empty(0, 4)
        part = local.read(shard)
        assert local.n_rows == 0 and part.shape == (0, 4 if seg.cols is None else 2)
        local.write(shard, part)
        assert shard.shape == (0, 4)


@pytest.mark.parametrize(
    ("shape", "a", "b"),
    [
        ((12,), Segment("all"), Segment("tail", rows=(range(8, 10),))),
        ((12, 10), Segment("cols", cols=(range(5, 8),)), Segment("row", rows=(range(2, 3),))),
        ((12, 10), Segment("all"), Segment("cell", rows=(range(11, 12),), cols=(range(9, 10),))),
    ],
    ids=["vector", "matrix", "matrix-all"],
)
def test_a_segment_covering_all_rows_or_columns_overlaps_any_that_shares_a_cell(shape, a, b):
    with pytest.raises(ValueError, match=f"^segments '{a.name}' and '{b.name}' overlap$"):
        check_segments([a, b], shape)


def test_segment_rows_may_touch_but_not_share_an_index():
    Segment("s", rows=(range(0, 2), range(2, 3)))  # adjacent runs: rows 0, 1, 2
    Segment("s", rows=(range(0, 6, 2), range(5, 6)))  # 0, 2, 4 then 5
    with pytest.raises(ValueError, match=r"^segment 's': rows must be non-empty increasing ranges$"):
        Segment("s", rows=(range(0, 3), range(2, 5)))  # row 2 twice


# --------------------------------------------------------------------------------- fused set_segments
def test_a_segment_state_key_splits_at_the_end_of_the_segments_name():
    from leantune.optim.segments import segment_key, split_segment_key

    assert split_segment_key(segment_key("a", "exp_avg")) == ("a", "exp_avg")
    assert split_segment_key(segment_key("a", "inner|count")) == ("a", "inner|count")  # an inner "|"
    assert split_segment_key("exp_avg") == (None, "exp_avg")


def test_set_segments_names_a_parameter_it_does_not_hold():
    opt = AdaLomo([torch.nn.Parameter(torch.zeros(3, 2))], lr=0.1)
    with pytest.raises(ValueError, match=r"^set_segments: a parameter that this optimizer does not hold$"):
        opt.set_segments({torch.nn.Parameter(torch.zeros(3, 2)): [Segment("a")]})


def test_set_segments_leaves_unchanged_parameters_alone_and_goes_on_to_the_next():
    torch.manual_seed(0)
    w, v = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    opt = AdaLomo([("w", w), ("v", v)], lr=0.1)
    opt.backward((w * v).sum())
    state_w = copy.deepcopy(dict(opt.state[w]))
    assert state_w
    # w has no segments: "none" again is no change, so its statistics stay
    opt.set_segments({"w": [], "v": [Segment("top", rows=(range(0, 2),))]})
    assert set(opt.state[w]) == set(state_w)
    assert all(torch.equal(torch.as_tensor(opt.state[w][k]), torch.as_tensor(state_w[k])) for k in state_w)
    assert opt.segments(v) == (Segment("top", rows=(range(0, 2),)),)
    assert opt.segments(w) == ()  # no segments: an empty tuple, so callers can iterate it
    opt.set_segments({"v": [Segment("top", rows=(range(0, 2),))], "w": [Segment("b", rows=(range(5, 6),))]})
    assert opt.segments(w) == (Segment("b", rows=(range(5, 6),)),)


def test_a_segment_given_new_indices_under_its_old_name_starts_afresh_on_the_new_cells():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = AdaLomo([p], lr=0.1)
    opt.set_segments({p: [Segment("a", rows=(range(0, 2),))]})
    opt.backward((p * torch.randn(8, 4)).sum())
    assert any(k.startswith("a|") for k in opt.state[p])
    opt.set_segments({p: [Segment("a", rows=(range(5, 8),))]})
    assert not opt.state[p]  # same name, other cells: not the same segment
    before = p.detach().clone()
    opt.backward((p * torch.randn(8, 4)).sum())
    assert torch.equal(p.detach()[:5], before[:5]) and not torch.equal(p.detach()[5:], before[5:])
    assert int(opt.state[p]["a|step"]) == 1


def test_lomo_defaults_are_lr_1e_2_and_seed_0():
    model = _linear()
    opt = LOMO(model)
    assert opt.defaults["lr"] == 1e-2 and opt.defaults["weight_decay"] == 0.0
    # the default seed draws the same stochastic rounding as seed=0 and not as seed=1
    runs = {}
    for seed in (None, 0, 1):
        m = _linear().to(torch.bfloat16)
        o = LOMO(m, lr=1e-3, rounding="stochastic", **({} if seed is None else {"seed": seed}))
        o.backward(m(torch.ones(2, m.in_features, dtype=torch.bfloat16)).float().square().sum())
        runs[seed] = m.weight.detach().clone()
    assert torch.equal(runs[None], runs[0]) and not torch.equal(runs[None], runs[1])


# ------------------------------------------------------------------------------------------ factory
@pytest.mark.parametrize(("name", "cls"), [("lion", "Lion"), ("adan", "Adan"), ("sophia", "SophiaH")])
def test_build_optimizer_builds_the_pytorch_optimizer_class_with_the_hyperparameters(name, cls):
    import pytorch_optimizer

    model = _linear()
    opt = build_optimizer(name, model, lr=0.0123)
    assert type(opt) is getattr(pytorch_optimizer, cls)
    assert opt.param_groups[0]["lr"] == 0.0123


def test_build_optimizer_takes_a_plain_list_of_parameters():
    model = _linear()
    params = list(model.parameters())
    opt = build_optimizer("SGD", params, lr=0.1, momentum=0.9)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["params"] == params
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.1


def test_every_in_backward_name_is_described_as_its_base_stepped_by_in_backward():
    names = optimizer_names()
    wrapped = [n for n in names if n.endswith("_in_backward")]
    assert wrapped and "adamw_in_backward" in wrapped
    for n in wrapped:
        base = names[n.removesuffix("_in_backward")]
        assert names[n] == f"{base}, stepped inside backward by leantune.optim.InBackward"


def test_only_sophia_needs_the_graph_of_the_gradients():
    assert needs_create_graph("sophia") and needs_create_graph("Sophia")
    assert [n for n in optimizer_names() if needs_create_graph(n)] == ["sophia"]


def _shard_matches_whole(name: str) -> bool:
    """Two steps on a 4x6 tensor against the same steps on its two 2x6 halves as separate tensors."""
    g = torch.Generator().manual_seed(3)
    w0, grads = torch.randn(4, 6, generator=g), [torch.randn(4, 6, generator=g) for _ in range(2)]
    whole = torch.nn.Parameter(w0.clone())
    halves = [torch.nn.Parameter(w0[:2].clone()), torch.nn.Parameter(w0[2:].clone())]
    opts = [build_optimizer(name, [whole], lr=0.01), build_optimizer(name, halves, lr=0.01)]
    for grad in grads:
        whole.grad, halves[0].grad, halves[1].grad = grad.clone(), grad[:2].clone(), grad[2:].clone()
        for opt in opts:
            opt.step()
    return torch.allclose(whole.detach(), torch.cat([h.detach() for h in halves]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "lion", "adan"])
def test_is_elementwise_says_whether_a_shard_updates_as_its_part_of_the_whole(name):
    measured = _shard_matches_whole(name)
    assert is_elementwise(name) is measured and is_elementwise(f"{name}_in_backward") is measured
    assert measured is (name != "adafactor")


def test_of_the_fused_and_hessian_optimizers_only_lomo_is_elementwise():
    assert is_elementwise("lomo") and is_elementwise("LOMO")
    assert not is_elementwise("adalomo") and not is_elementwise("sophia") and not is_elementwise("galore")


# ------------------------------------------------------------------- Collectives.import_state
class _FakeDTensor:
    """Stands for a DTensor (what FSDP2 gives): only its two accessors matter to import_state."""

    def __init__(self, local: torch.Tensor, full: torch.Tensor) -> None:
        self._local, self._full = local, full

    def to_local(self) -> torch.Tensor:
        return self._local

    def full_tensor(self) -> torch.Tensor:
        return self._full


def test_import_state_gathers_for_a_plain_parameter_and_keeps_the_shard_for_a_sharded_one():
    from leantune.optim.collectives import Collectives

    c = Collectives()
    local, full = torch.ones(2), torch.arange(4.0)
    value = _FakeDTensor(local, full)
    # A state saved sharded (a DTensor), loaded where the parameter is whole: the full tensor.
    assert c.import_state(torch.zeros(4), "v", value) is full
    # The parameter is itself sharded: this rank's shard of the state.
    assert c.import_state(_FakeDTensor(torch.zeros(2), torch.zeros(4)), "v", value) is local
    # No parameter to compare with (e.g. a segment's state): the local part.
    assert c.import_state(None, "v", value) is local
    # Plain values pass through untouched, whatever the parameter.
    plain = torch.zeros(3)
    assert c.import_state(torch.zeros(3), "v", plain) is plain
    assert c.import_state(_FakeDTensor(plain, plain), "step", 7) == 7
