"""The fused engine against plain loops and literal expectations: GradientView's sums and shapes,
loss scaling with accumulation and replicated averaging, seeds and scalers through state_dict, the
multi-rank refusal at the first backward and shards found there (threaded ranks, in-process), the
device of an empty gradient's square sum and of loaded state ("meta") (survivors of mutmut)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from leantune.optim import LOMO, AdaLomo, InBackward, LossScaler
from leantune.optim.collectives import Collectives
from leantune.optim.engine import GradientView
from leantune.optim.segments import Segment
from tests.threaded import run_ranks

LR = 0.1


# ----------------------------------------------------------------------------------- GradientView
def test_full_is_the_effective_gradient_shaped_rows_by_cols():
    g = torch.arange(6.0).reshape(2, 3)
    acc = torch.ones(2, 3)
    assert GradientView(g, None).full().shape == (2, 3)
    out = GradientView(g, acc, inv_scale=0.5, clip_value=1.5).full()
    assert out.shape == (2, 3) and out.tolist() == [[1.0, 1.5, 1.5], [1.5, 1.5, 1.5]]


@pytest.mark.parametrize("max_elements", [2, 3, 100])
@pytest.mark.parametrize("which", ["grad", "acc"])
def test_square_sum_over_chunks_is_the_sum_of_squares_of_the_whole_gradient(which, max_elements):
    values = torch.arange(-5.0, 7.0).reshape(4, 3)
    view = GradientView(values, None) if which == "grad" else GradientView(None, values)
    total = view.square_sum(max_elements)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert float(total) == pytest.approx(sum(v * v for v in range(-5, 7)), rel=1e-6)


def test_square_sum_is_fp32_when_torch_default_dtype_is_fp64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        total = GradientView(torch.ones(2, 2, dtype=torch.float32), None).square_sum(2)
    finally:
        torch.set_default_dtype(before)
    assert total.dtype == torch.float32 and float(total) == pytest.approx(4.0, rel=1e-6)


def test_square_sum_of_a_half_precision_accumulation_is_summed_in_fp32():
    """GradientView is public: a buffer it is given in fp16 is squared and summed in fp32 (in fp16,
    300^2 = 90000 already exceeds its largest value, 65504)."""
    view = GradientView(None, torch.full((2, 2), 300.0, dtype=torch.float16))
    for max_elements in (2, 4):
        total = view.square_sum(max_elements)
        assert total.dtype == torch.float32 and float(total) == 360000.0


def test_has_nonfinite_sums_a_half_precision_accumulation_in_fp32():
    """Four fp16 values of 60000 sum to 240000 in fp32 (finite), inf in fp16; a real inf is found."""
    big = torch.full((2, 2), 60000.0, dtype=torch.float16)
    assert GradientView(None, big).has_nonfinite(4) is False
    big[1, 1] = float("inf")
    assert GradientView(None, big).has_nonfinite(4) is True


# ------------------------------------------------------- loss scale, accumulation, replicated mean
class _HalvingCollectives(Collectives):
    """Replicated data parallelism with a second rank whose gradient is zero: the mean is half."""

    replicated = True

    def average_gradient(self, grad):
        return grad.mul_(0.5)


def _two_layers():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 2, bias=False)


def _micro_loss(a, b, x, use_b):
    h = a(x)
    return (b(h) ** 2).mean() if use_b else (h**2).mean()


@pytest.mark.parametrize(("collectives", "factor"), [(None, 1.0), (_HalvingCollectives(), 0.5)])
@pytest.mark.parametrize("loss_scale", [None, 8.0])
def test_accumulated_steps_with_a_layer_unseen_in_the_last_micro_batch_equal_sgd_on_the_mean(
    collectives, factor, loss_scale
):
    """Two micro-batches, the second of which does not reach layer b (its gradient lives only in
    the accumulation buffer): the update is SGD on the mean gradient, unscaled, averaged."""
    a, b = _two_layers()
    ra, rb = _two_layers()
    kwargs = {"collectives": collectives} if collectives is not None else {}
    opt = LOMO(
        [*a.parameters(), *b.parameters()], lr=LR, accumulation_steps=2, loss_scale=loss_scale, **kwargs
    )
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        xs = [torch.randn(4, 3, generator=gen) for _ in range(2)]
        for i, x in enumerate(xs):
            opt.backward(_micro_loss(a, b, x, use_b=i == 0))
        ref_params = [ra.weight, rb.weight]
        grads = [torch.zeros_like(p) for p in ref_params]
        for i, x in enumerate(xs):
            loss = _micro_loss(ra, rb, x, use_b=i == 0)
            used = ref_params if i == 0 else ref_params[:1]
            for k, gr in enumerate(torch.autograd.grad(loss, used)):
                grads[k] += gr / 2
        with torch.no_grad():
            for p, gr in zip(ref_params, grads):
                p -= LR * factor * gr
    torch.testing.assert_close(a.weight, ra.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.weight, rb.weight, rtol=1e-5, atol=1e-7)


def test_clipping_with_no_trainable_gradient_names_the_problem():
    model = torch.nn.Linear(2, 2)
    opt = LOMO(model, lr=LR, clip_grad_norm=1.0)
    other = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="none of its 2 trainable parameters received a gradient"):
        opt.backward((other * 2).sum())


# ------------------------------------------------------------------------------ seeds and offsets
class _Offset(Collectives):
    def __init__(self, offset):
        self.offset = offset

    def seed_offset(self):
        return self.offset


def test_the_rank_offset_is_added_to_the_seed_of_stochastic_rounding():
    """seed 3 with offset 4 rounds exactly as seed 7 without one."""
    results = []
    for seed, offset in [(3, 4), (7, 0)]:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8).to(torch.bfloat16)
        opt = LOMO(model, lr=1e-3, rounding="stochastic", seed=seed, collectives=_Offset(offset))
        for step in range(2):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
            opt.backward(model(x).float().pow(2).mean())
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_the_seed_travels_through_the_state_dict():
    a = LOMO(torch.nn.Linear(2, 2), lr=LR, rounding="stochastic", seed=5)
    b = LOMO(torch.nn.Linear(2, 2), lr=LR, rounding="stochastic", seed=9)
    sd = a.state_dict()
    assert sd["leantune"]["seed"] == 5
    b.load_state_dict(sd)
    assert b.seed == 5 and b.state_dict()["leantune"]["seed"] == 5


def test_an_engine_state_without_a_seed_keeps_the_optimizers_own():
    opt = LOMO(torch.nn.Linear(2, 2), lr=LR, seed=9)
    extra = opt.engine_state_dict()
    del extra["seed"]
    opt.load_engine_state_dict(extra)
    assert opt.seed == 9


def test_loading_a_loss_scaler_into_an_optimizer_without_one_creates_it():
    src = LOMO(torch.nn.Linear(2, 2), lr=LR, loss_scale=LossScaler(64.0, growth_interval=3))
    dst = LOMO(torch.nn.Linear(2, 2), lr=LR)
    dst.load_state_dict(src.state_dict())
    assert dst.loss_scaler is not None
    assert (dst.loss_scaler.scale, dst.loss_scaler.growth_interval, dst.loss_scaler.dynamic) == (
        64.0,
        3,
        True,
    )


def test_loading_keeps_the_loss_scaler_object_the_optimizer_was_given():
    scaler = LossScaler(8.0)
    src = LOMO(torch.nn.Linear(2, 2), lr=LR, loss_scale=LossScaler(64.0, growth_interval=3))
    dst = LOMO(torch.nn.Linear(2, 2), lr=LR, loss_scale=scaler)
    dst.load_state_dict(src.state_dict())
    assert dst.loss_scaler is scaler and scaler.scale == 64.0 and scaler.growth_interval == 3


# -------------------------------------------------------------------------------------- state_dict
def test_state_after_a_stateless_parameter_is_restored_in_fp32():
    """torch casts loaded state to the parameter's dtype; every parameter's fp32 statistics come
    back fp32 and bitwise, also those that follow a parameter without state."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 2).to(torch.bfloat16)) for _ in range(3)]
    ps[0].requires_grad_(False)  # no state
    opt = AdaLomo(ps, lr=LR)
    opt.backward(sum((p.float() ** 2).sum() for p in ps[1:]))
    sd = opt.state_dict()
    clones = [torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in ps]
    fresh = AdaLomo(clones, lr=LR)
    fresh.load_state_dict(sd)
    for p, q in zip(ps[1:], clones[1:]):
        for key in ("row", "col"):
            assert fresh.state[q][key].dtype == torch.float32
            assert torch.equal(fresh.state[q][key], opt.state[p][key])


def test_loading_segment_state_into_a_parameter_without_that_segment_names_the_key():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 2))
    opt = AdaLomo([p], lr=LR)
    opt.set_segments({p: [Segment("a", rows=(range(0, 2),))]})
    opt.backward((p**2).sum())
    fresh = AdaLomo([torch.nn.Parameter(p.detach().clone())], lr=LR)
    with pytest.raises(KeyError, match="names a segment this parameter does not have"):
        fresh.load_state_dict(opt.state_dict())


class _CountingSGD(torch.optim.SGD):
    """SGD that also counts its steps under an integer state key (torch.optim allows any key)."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p][1] = self.state[p].get(1, 0) + 1


def test_state_keys_that_are_not_strings_are_saved_and_loaded_as_they_are():
    model = torch.nn.Linear(2, 2)
    opt = InBackward(_CountingSGD, model, lr=LR)
    opt.backward(model(torch.ones(1, 2)).sum())
    sd = opt.state_dict()
    assert all(st[1] == 1 for st in sd["state"].values())
    fresh = InBackward(_CountingSGD, torch.nn.Linear(2, 2), lr=LR)
    fresh.load_state_dict(sd)
    assert [st[1] for st in fresh.state.values()] == [1, 1]


# ------------------------------------------------------------------------- context at first backward
MULTI_RANK_MESSAGE = (
    "LOMO: this process is one of 2 ranks and the parameters are plain (replicated) tensors, so each "
    "rank would update its own copy. Choose: collectives='replicated' to average every gradient over "
    "the ranks inside its hook (data parallelism: do not also wrap the model in "
    "DistributedDataParallel), or collectives='local' to train each rank on its own; or shard the "
    "model with torch.distributed.fsdp.fully_shard before building the optimizer"
)


def test_plain_parameters_on_two_ranks_are_refused_at_the_first_backward_with_the_choices():
    def rank_fn(rank):
        model = torch.nn.Linear(2, 2)
        opt = LOMO(model, lr=LR)
        with pytest.raises(RuntimeError) as err:
            opt.backward(model(torch.ones(1, 2)).sum())
        return str(err.value)

    assert run_ranks(2, rank_fn) == [MULTI_RANK_MESSAGE] * 2


def test_the_context_is_checked_once_at_the_first_backward():
    """An optimizer that has stepped in one process keeps working when a process group appears."""
    model = torch.nn.Linear(2, 2)
    opt = LOMO(model, lr=LR)
    opt.backward(model(torch.ones(1, 2)).sum())

    def rank_fn(rank):
        if rank == 0:
            return opt.backward(model(torch.ones(1, 2)).sum()).updated
        return True

    assert run_ranks(2, rank_fn) == [True, True]


# ------------------------------------------------------------------- devices (meta stands for one)
def test_the_square_sum_of_an_empty_gradient_is_a_zero_on_the_gradients_device():
    """A rank whose shard of a tensor is empty still sends its zero to the norm's collective, which
    takes tensors on the gradient's device only (NCCL): the "meta" device stands for a GPU here."""
    total = GradientView(torch.empty(0, 3, device="meta"), None).square_sum(4)
    assert total.device.type == "meta" and total.dtype == torch.float32 and total.dim() == 0


def test_loaded_state_is_moved_to_the_device_of_its_parameter():
    """State saved on the CPU (a checkpoint loaded with map_location="cpu") goes to the parameter's
    device, in its saved fp32 ("meta" stands for a GPU), not left where it was loaded."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = AdaLomo([p], lr=LR)
    opt.backward((p**2).sum())
    q = torch.nn.Parameter(torch.empty(3, 2, dtype=torch.bfloat16, device="meta"))
    fresh = AdaLomo([q], lr=LR)
    fresh.load_state_dict(opt.state_dict())
    for key in ("row", "col"):
        value = fresh.state[q][key]
        assert value.device.type == "meta" and value.dtype == torch.float32
        assert value.shape == opt.state[p][key].shape


# ---------------------------------------------------------- shards made trainable after building
def test_shards_made_trainable_after_building_are_found_at_the_first_backward():
    """Built while its only parameter (an FSDP2-style Shard(0) DTensor over 2 ranks) is frozen, the
    optimizer cannot tell its context; unfrozen, the first backward finds the shards and clips by
    the norm of the whole tensor: SGD with g = 2w (loss sum(w^2)) scaled to norm 1 on both ranks."""
    full = torch.arange(1.0, 9.0).reshape(4, 2)

    def rank_fn(rank):
        mesh = init_device_mesh("cpu", (2,))
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]), requires_grad=False)
        opt = LOMO([p], lr=LR, clip_grad_norm=1.0)
        p.requires_grad_(True)
        opt.refresh_hooks()
        result = opt.backward((p.to_local() ** 2).sum())
        return result.grad_norm, p.full_tensor().detach()

    g = 2 * full
    expected = full - LR * g / g.norm()
    for norm, weights in run_ranks(2, rank_fn):
        assert norm == pytest.approx(float(g.norm()), rel=1e-6)
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ norm shares (tensor-parallel replicas)
class _Shares(Collectives):
    """Identity collectives where ``shares`` (by parameter identity) weight a tensor's sum(g^2)
    in the global norm, as for a tensor replicated beside tensor-parallel shards."""

    def __init__(self, shares: dict[int, float]) -> None:
        self.shares = shares

    def norm_share(self, param: torch.Tensor) -> float:
        return self.shares.get(id(param), 1.0)


def _mean_grads(model, batches):
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        for acc, g in zip(grads, torch.autograd.grad(loss, list(model.parameters()))):
            acc += g / len(batches)
    return grads


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_global_norm_weights_each_tensor_by_its_norm_share(accumulation):
    """The reported norm is sqrt(sum_p share_p * |g_p|^2), with and without accumulation buffers."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(accumulation)]
    grads = _mean_grads(model, batches)
    opt = LOMO(model, lr=LR, clip_grad_norm=1e6, accumulation_steps=accumulation)
    opt.collectives = _Shares({id(model.weight): 0.25})
    for x, y in batches:
        result = opt.backward(torch.nn.functional.mse_loss(model(x), y))
    want = (0.25 * grads[0].square().sum() + grads[1].square().sum()).sqrt()
    assert result.updated and result.grad_norm == pytest.approx(float(want), rel=1e-5)


def test_an_inf_in_accumulated_gradients_skips_the_step_and_says_so():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = LOMO(model, lr=LR, clip_grad_norm=1.0, accumulation_steps=2)
    x = torch.randn(4, 5)
    opt.backward(model(x).sum())
    result = opt.backward(model(x).sum() * float("inf"))
    assert result.updated is False and result.skipped is True and not math.isfinite(result.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_state_dict_without_leantunes_entry_loads():
    """A state dict another writer built (e.g. torch's own format, without leantune's seeds and
    scaler) loads: the per-parameter state and groups are torch's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = AdaLomo(model, lr=LR)
    opt.backward(model(torch.randn(4, 5)).square().sum())
    saved = opt.state_dict()
    assert "leantune" in saved
    plain = {k: v for k, v in saved.items() if k != "leantune"}
    opt.remove_hooks()
    fresh = AdaLomo(model, lr=LR)
    fresh.load_state_dict(plain)
    for p in model.parameters():
        assert fresh.state[p].keys() == opt.state[p].keys()
        assert all(torch.equal(torch.as_tensor(fresh.state[p][k]), torch.as_tensor(opt.state[p][k]))
                   for k in opt.state[p])  # fmt: skip


# ------------------------------------------------------------------------------ backward's contract
def test_backward_frees_the_graph_unless_asked_to_keep_it():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = LOMO(model, lr=LR)
    loss = model(torch.randn(4, 5)).square().sum()
    opt.backward(loss)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    kept = model(torch.randn(4, 5)).square().sum()
    opt.backward(kept, retain_graph=True)
    torch.autograd.grad(kept, [model.weight])  # still there


def test_backward_refuses_a_non_scalar_loss_and_a_nested_call_with_the_messages():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = LOMO(model, lr=LR)
    with pytest.raises(ValueError, match=r"^loss must be a scalar, got shape \(4, 3\)$"):
        opt.backward(model(torch.randn(4, 5)))
    seen = []

    def nested(grad):  # a hook that calls backward again while the first is running
        try:
            opt.backward(model(torch.randn(1, 5)).sum())
        except RuntimeError as err:
            seen.append(str(err))
        return grad

    handle = model.bias.register_hook(nested)
    opt.backward(model(torch.randn(4, 5)).sum())
    handle.remove()
    assert seen == ["opt.backward() is not re-entrant"]


def test_a_static_loss_scale_multiplies_the_loss_and_divides_the_gradient():
    """LOMO (plain SGD, not invariant to the gradient's scale) with a static scale of 1024 on fp32:
    the same update as torch SGD, so the scale reached both the loss and the gradient."""
    torch.manual_seed(0)
    model, ref = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 5)
    opt = LOMO(model, lr=LR, loss_scale=1024.0)
    result = opt.backward(model(x).square().mean())
    assert result.loss_scale == 1024.0
    sgd = torch.optim.SGD(ref.parameters(), lr=LR)
    ref(x).square().mean().backward()
    sgd.step()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_the_scalar_a_rank_with_nothing_sends_is_fp32_under_an_fp64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.nn.Linear(5, 3).float()
        opt = LOMO(model, lr=LR, clip_grad_norm=1.0)
        zero = opt._scalar_zero()
    finally:
        torch.set_default_dtype(before)
    assert zero.dtype == torch.float32 and zero.dim() == 0 and float(zero) == 0.0


def test_nonfinite_is_found_chunk_by_chunk_not_by_a_sum_of_the_whole_that_overflows():
    big = torch.finfo(torch.float32).max / 2
    g = torch.tensor([[big], [big], [big]])  # finite; any two of them sum to inf in fp32
    assert GradientView(g, None).has_nonfinite(1) is False
    assert GradientView(torch.tensor([[1.0], [float("nan")], [2.0]]), None).has_nonfinite(1) is True


def test_a_static_loss_scale_keeps_fp16_gradients_from_underflowing():
    """Gradients of about 1e-9 are zero in fp16; scaled by 2^16 before backward they survive, and
    the unscaled update matches fp32 SGD (to fp16's precision)."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5)

    def loss_of(m):
        return 1e-9 * m(x.to(m.weight.dtype)).float().square().mean()

    updated = {}
    for scale in (None, 2.0**16):
        model = torch.nn.Linear(5, 3).half()
        model.load_state_dict(ref.state_dict())
        LOMO(model, lr=1e9, loss_scale=scale).backward(loss_of(model))
        updated[scale] = model.weight.detach().float()
    assert torch.equal(updated[None], ref.weight.detach().half().float())  # underflowed: no update
    sgd = torch.optim.SGD(ref.parameters(), lr=1e9)
    loss_of(ref).backward()
    sgd.step()
    assert (ref.weight.detach() - updated[None]).abs().max() > 0.05  # a visible update
    torch.testing.assert_close(updated[2.0**16], ref.weight.detach(), rtol=2e-2, atol=2e-3)


def test_the_accumulation_buffer_of_bf16_weights_is_fp32():
    """Micro-batch gradients of bf16 weights are summed in fp32 (the documented 4 bytes per
    parameter), not in bf16, where small micro-batch gradients would be lost in the sum."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).to(torch.bfloat16)
    opt = LOMO(model, lr=LR, accumulation_steps=2)
    opt.backward(model(torch.randn(4, 5, dtype=torch.bfloat16)).float().square().mean())
    assert {opt.state[p]["grad_acc"].dtype for p in model.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------ what a user is told
@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: LOMO(torch.nn.Module()), ValueError, "the model has no parameters"),
        (lambda: LOMO(torch.zeros(2, requires_grad=True)), TypeError,
         "params must be a model or an iterable of tensors, not a single tensor"),
        (lambda: LOMO([]), ValueError, "optimizer got an empty parameter list"),
        (lambda: LOMO(torch.nn.Linear(2, 2), clip_grad_norm=0.0), ValueError,
         "Invalid clip_grad_norm: 0.0 (must be a number > 0 or None)"),
        (lambda: LOMO(torch.nn.Linear(2, 2), clip_grad_value=True), ValueError,
         "Invalid clip_grad_value: True (must be a number > 0 or None)"),
    ],
    ids=["no-parameters", "one-tensor", "empty-list", "clip-norm-0", "clip-value-true"],
)  # fmt: skip
def test_bad_parameters_and_options_are_refused_with_the_whole_message(make, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        make()


def test_the_positive_check_without_none_says_so():
    from leantune.optim.engine import _check_positive

    with pytest.raises(ValueError, match=r"^Invalid n: None \(must be a number > 0\)$"):
        _check_positive("n", None, allow_none=False)
    _check_positive("n", 0.5, allow_none=False)


def test_a_model_inside_ddp_or_fsdp1_is_refused_with_what_to_do_instead():
    import torch.distributed as dist

    model = torch.nn.Linear(2, 2)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError) as info:
            LOMO(wrapped)
    finally:
        dist.destroy_process_group()
    assert str(info.value) == (
        "a fused optimizer cannot run inside DistributedDataParallel: its hooks update each parameter "
        "as soon as its gradient is complete, possibly before DDP has averaged it over the ranks. "
        "Build the optimizer on the model itself (ddp.module) with collectives='replicated', which "
        "averages each gradient inside its hook, and do not wrap the model in DDP; or shard it with "
        "torch.distributed.fsdp.fully_shard (FSDP2)"
    )
    flat = torch.nn.Linear(2, 2)
    flat.weight._is_flat_param = True  # what FSDP1 leaves on its flattened parameters
    with pytest.raises(ValueError, match=r"^a fused optimizer cannot update FSDP1 .*finds the shards"):
        LOMO(flat)


def test_a_gradient_view_needs_a_gradient_or_a_buffer():
    with pytest.raises(ValueError, match=r"^GradientView needs a gradient or an accumulation buffer$"):
        GradientView(None, None)


def test_a_plain_backward_names_the_optimizer_and_what_to_call():
    model = torch.nn.Linear(2, 2)
    LOMO(model, lr=LR)
    with pytest.raises(RuntimeError, match=r"^LOMO: a gradient arrived outside opt\.backward\(loss\)"):
        model(torch.ones(1, 2)).sum().backward()


def test_a_parameter_group_added_later_is_updated_inside_backward():
    model, extra = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.ones(3))
    opt = LOMO(list(model.parameters()), lr=LR)
    opt.add_param_group({"params": [extra]})
    opt.backward(model(torch.ones(1, 2)).sum() + (extra * torch.arange(3.0)).sum())
    assert torch.equal(extra.detach(), torch.ones(3) - LR * torch.arange(3.0))


def test_a_second_optimizer_on_the_same_parameters_is_refused_until_the_first_lets_go():
    model = torch.nn.Linear(2, 2)
    first = LOMO(model, lr=LR)
    with pytest.raises(ValueError, match=r"^a parameter is already managed by another fused optimizer; call "
                       r"remove_hooks\(\) on the old optimizer before creating a new one$"):  # fmt: skip
        AdaLomo(model, lr=LR)
    first.remove_hooks()
    AdaLomo(model, lr=LR)


def test_freezing_a_parameter_that_never_had_state_is_fine():
    model = torch.nn.Linear(2, 2)
    opt = LOMO(model, lr=LR)
    model.bias.requires_grad_(False)
    opt.refresh_hooks()
    opt.backward(model(torch.ones(1, 2)).sum())
    assert model.bias not in opt.state or not opt.state[model.bias]


@pytest.mark.parametrize("loss_scale", [None, 8.0])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_replicated_clipping_averages_each_gradient_once(loss_scale, accumulation_steps):
    """Replicated averaging with active norm clipping: the norm is measured on the averaged
    gradient and the update applies it once (the measuring pass must not average or unscale the
    gradient in place, or the update would see it twice) = SGD + clip_grad_norm_ on the mean."""
    a, b = _two_layers()
    ra, rb = _two_layers()
    opt = LOMO([*a.parameters(), *b.parameters()], lr=LR, clip_grad_norm=0.05, loss_scale=loss_scale,
               accumulation_steps=accumulation_steps, collectives=_HalvingCollectives())  # fmt: skip
    ref = torch.optim.SGD([ra.weight, rb.weight], lr=LR)
    for step in range(2):
        gen = torch.Generator().manual_seed(10 + step)
        xs = [torch.randn(4, 3, generator=gen) for _ in range(accumulation_steps)]
        for x in xs:
            result = opt.backward(_micro_loss(a, b, x, use_b=True))
        ref.zero_grad()
        for x in xs:
            (_micro_loss(ra, rb, x, use_b=True) * 0.5 / accumulation_steps).backward()  # the halved mean
        norm = torch.nn.utils.clip_grad_norm_([ra.weight, rb.weight], 0.05)
        assert norm > 0.05  # clipping is active
        torch.testing.assert_close(torch.as_tensor(result.grad_norm), norm, rtol=1e-5, atol=0)
        ref.step()
    torch.testing.assert_close(a.weight, ra.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.weight, rb.weight, rtol=1e-5, atol=1e-7)


def test_replicated_averaging_sums_an_fp32_copy_of_a_bf16_gradient():
    """gloo/NCCL sums in the tensor's dtype: bf16 gradients are averaged as fp32 copies (the
    accumulated fp32 buffer added to them exactly), never in bf16 or in place in the gradient."""
    seen = []

    class Recording(Collectives):
        replicated = True

        def average_gradient(self, grad):
            seen.append((grad.dtype, grad.clone()))
            return grad

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    opt = LOMO(model, lr=LR, accumulation_steps=2, collectives=Recording())
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(2)]
    grads = [torch.autograd.grad((model(x).float() ** 2).mean(), model.weight)[0] for x in xs]
    for x in xs:
        opt.backward((model(x).float() ** 2).mean())
    ((dtype, total),) = seen
    assert dtype == torch.float32
    # the last micro-batch's bf16 gradient plus the fp32 buffer of the first, each over 2 micro-batches
    torch.testing.assert_close(total, (grads[0].float() + grads[1].float()) / 2, rtol=0, atol=0)
