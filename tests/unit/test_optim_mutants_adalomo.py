"""AdaLomo against the paper's update written out in fp64 here, on the paths the Adafactor oracle
does not take: 3-D and 0-d tensors, a large eps1, clip_threshold != 1, weight_decay = 1, bf16 with
Kahan, torch's default dtype set to fp64, clip_grad_value, the bare adalomo_update (no workspace,
no global shape) and what it asks of its workspace and collectives (survivors of mutmut)."""

from __future__ import annotations

import math

import pytest
import torch

from leantune.optim import AdaLomo
from leantune.optim.adalomo import adalomo_update
from leantune.optim.collectives import Collectives
from leantune.optim.engine import GradientView
from leantune.optim.precision import WriteBack

SHAPES = {"w3": (2, 3, 4), "w2": (5, 3), "b": (3,), "s": ()}


def paper_update(p, g, st, *, lr, wd, eps=(1e-30, 1e-3), clip=1.0, decay=-0.8):
    """The new value of ``p`` after one AdaLomo step (arXiv 2310.10195), in plain fp64; tensors of
    two or more dimensions factored as (prod(shape[:-1]), shape[-1]) matrices."""
    p, g = p.detach().double(), g.double()
    eps1, eps2 = eps
    t = st["t"] = st.get("t", 0) + 1
    rho = 1 - t**decay
    big = g * g + eps1
    if p.dim() >= 2:
        rows, g2 = big.reshape(-1, p.shape[-1]), g.reshape(-1, p.shape[-1])
        r = st["r"] = rho * st.get("r", 0.0) + (1 - rho) * rows.mean(1)
        c = st["c"] = rho * st.get("c", 0.0) + (1 - rho) * rows.mean(0)
        u = (g2 / torch.sqrt(torch.outer(r / r.mean(), c))).reshape(p.shape)
    else:
        v = st["v"] = rho * st.get("v", 0.0) + (1 - rho) * big
        u = g / torch.sqrt(v)

    def rms(x):
        return x.pow(2).mean().sqrt().item()

    u = u / max(1.0, rms(u) / clip)
    eta = lr * max(eps2, rms(p))
    return p * (1 - eta * wd) - eta * u


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for k, s in SHAPES.items()}


def _loss(ps, step):
    g = torch.Generator().manual_seed(50 + step)
    x, y = torch.randn(4, generator=g), torch.randn(5, generator=g)
    dtype = ps["w2"].dtype
    h = (ps["w3"] @ x.to(dtype)).sum(0)  # (3,)
    z = ps["w2"] @ (h + ps["b"]) * ps["s"]
    return ((z.float() - y) ** 2).sum()


def _grads(values, step):
    """The gradients at ``values`` (the same operations as the optimized copy)."""
    ps = {k: v.detach().clone().requires_grad_() for k, v in values.items()}
    grads = torch.autograd.grad(_loss(ps, step), list(ps.values()))
    return dict(zip(ps, grads))


def _run(steps=2, dtype=torch.float32, hyper=None, **opt_kwargs):
    """(the optimizer, its parameters, the paper's values after the same steps)."""
    hyper = hyper or {}
    ps = _params(dtype)
    expected = {k: p.detach().clone() for k, p in ps.items()}
    opt = AdaLomo(list(ps.items()), **opt_kwargs)
    states = {k: {} for k in ps}
    for step in range(steps):
        grads = _grads(expected, step)
        expected = {k: paper_update(expected[k], grads[k], states[k], **hyper).to(dtype) for k in ps}
        opt.backward(_loss(ps, step))
    return opt, ps, expected


def _assert_close(ps, expected, rtol=1e-5, atol=1e-6):
    for k, p in ps.items():
        torch.testing.assert_close(
            p.detach(), expected[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_clip_threshold_below_one_scales_the_update_down_to_that_rms():
    _, ps, expected = _run(lr=0.05, clip_threshold=0.5, hyper={"lr": 0.05, "wd": 0.0, "clip": 0.5})
    _assert_close(ps, expected)


def test_a_large_eps1_enters_the_row_and_column_means_of_3d_and_non_square_tensors():
    """eps1 comparable to g^2: the means are then over the right number of rows and columns."""
    eps = (1.0, 1e-3)
    _, ps, expected = _run(lr=0.05, eps=eps, hyper={"lr": 0.05, "wd": 0.0, "eps": eps})
    _assert_close(ps, expected)


def test_weight_decay_of_one_is_applied():
    _, ps, expected = _run(lr=0.05, weight_decay=1.0, hyper={"lr": 0.05, "wd": 1.0})
    _assert_close(ps, expected)


def test_clip_grad_value_clamps_the_gradient_before_the_paper_update():
    ps = _params()
    expected = {k: p.detach().clone() for k, p in ps.items()}
    opt = AdaLomo(list(ps.items()), lr=0.05, clip_grad_value=0.3)
    states = {k: {} for k in ps}
    for step in range(2):
        grads = _grads(expected, step)
        assert any(g.abs().max() > 0.3 for g in grads.values())
        expected = {
            k: paper_update(expected[k], grads[k].clamp(-0.3, 0.3), states[k], lr=0.05, wd=0.0).float()
            for k in ps
        }
        opt.backward(_loss(ps, step))
    _assert_close(ps, expected)


def test_bf16_with_kahan_keeps_the_exact_update_in_weight_plus_compensation():
    """Weight + Kahan buffer holds the fp32 result to ~2^-16: the parameter RMS (and so the step
    size) must be computed in fp32, not in bf16. Covers a 0-d parameter too."""
    ps = _params(torch.bfloat16)
    start = {k: p.detach().clone() for k, p in ps.items()}
    opt = AdaLomo(list(ps.items()), lr=0.5, rounding="kahan")
    grads = _grads(start, 0)
    opt.backward(_loss(ps, 0))
    for k, p in ps.items():
        exact = paper_update(start[k], grads[k], {}, lr=0.5, wd=0.0)
        held = p.detach().double() + opt.state[p]["kahan"].double()
        assert opt.state[p]["kahan"].shape == p.shape
        torch.testing.assert_close(held, exact, rtol=3e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_with_torch_default_dtype_fp64_the_state_stays_fp32_and_the_update_is_the_papers():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt, ps, expected = _run(lr=0.05, hyper={"lr": 0.05, "wd": 0.0})
    finally:
        torch.set_default_dtype(before)
    _assert_close(ps, expected)
    for k, p in ps.items():
        st = opt.state[p]
        assert {key: t.dtype for key, t in st.items() if torch.is_tensor(t)} == (
            {"row": torch.float32, "col": torch.float32} if p.dim() >= 2 else {"v": torch.float32}
        ), k


def test_the_documented_defaults():
    ps = _params()
    opt = AdaLomo(list(ps.items()))
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["eps"]) == (1e-3, 0.0, (1e-30, 1e-3))
    assert (group["decay_rate"], group["clip_threshold"]) == (-0.8, 1.0)
    assert opt.state_dict()["leantune"]["seed"] == 0


def test_decay_rate_must_be_strictly_negative():
    with pytest.raises(ValueError, match=r"^Invalid decay_rate: 0\.0 \(must be < 0, e\.g\. -0\.8\)$"):
        AdaLomo(list(_params().items()), decay_rate=0.0)
    AdaLomo(list(_params().items()), decay_rate=-1e-9)


class _Recording(Collectives):
    """One process, but remembers which tensors' statistics it was asked to sum over shards."""

    def __init__(self):
        self.asked: list[torch.Tensor] = []

    def shard_sum(self, param, partial):
        self.asked.append(param)
        return partial


def test_shard_sums_name_the_tensor_being_updated():
    ps = _params()
    rec = _Recording()
    opt = AdaLomo(list(ps.items()), lr=0.05, collectives=rec)
    opt.backward(_loss(ps, 0))
    assert rec.asked and all(any(a is p for p in ps.values()) for a in rec.asked)
    assert {id(a) for a in rec.asked} == {id(p) for p in ps.values()}


def _direct(param, grad, state, **kwargs):
    defaults = dict(
        lr=0.05,
        weight_decay=0.1,
        eps=(1e-30, 1e-3),
        decay_rate=-0.8,
        clip_threshold=1.0,
        writer=WriteBack("nearest"),
        chunk_elements=1 << 20,
    )
    view = grad if isinstance(grad, GradientView) else GradientView(grad, None)
    adalomo_update(param, view, state, **{**defaults, **kwargs})


@pytest.mark.parametrize("chunk_elements", [6, 9, 1 << 20], ids=["3-chunks", "2-chunks", "whole"])
@pytest.mark.parametrize("shape", [(5, 3), (3,)])
def test_adalomo_update_without_workspace_or_global_shape_is_the_papers(shape, chunk_elements):
    g = torch.Generator().manual_seed(3)
    p, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected, st_ref, state = p.double(), {}, {}
    for _ in range(2):
        expected = paper_update(expected, grad, st_ref, lr=0.05, wd=0.1)
        _direct(p, grad, state, chunk_elements=chunk_elements)
    torch.testing.assert_close(p, expected.float(), rtol=1e-5, atol=1e-6)
    assert state["step"] == 2


@pytest.mark.parametrize(("chunk_elements", "largest"), [(7, 6), (6, 6), (9, 9), (100, 15)])
def test_the_workspace_is_asked_for_the_largest_chunk_on_the_parameters_device(chunk_elements, largest):
    """(5, 3) rows in chunks of chunk_elements // 3 rows: the largest chunk has that many x 3."""
    asked = []

    def workspace(n, device):
        asked.append((n, device))
        return torch.empty(n)

    g = torch.Generator().manual_seed(4)
    p, grad = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ref = paper_update(p.clone(), grad, {}, lr=0.05, wd=0.1)
    _direct(p, grad, {}, chunk_elements=chunk_elements, workspace=workspace)
    assert asked == [(largest, torch.device("cpu"))]
    torch.testing.assert_close(p, ref.float(), rtol=1e-5, atol=1e-6)


def test_a_shard_without_rows_asks_for_no_workspace_and_stays_empty():
    asked = []

    def workspace(n, device):
        asked.append(n)
        return torch.empty(n)

    p, grad = torch.zeros(0, 3), torch.zeros(0, 3)
    state = {}
    _direct(p, grad, state, workspace=workspace, global_shape=torch.Size([4, 3]))
    assert asked == [] and p.shape == (0, 3) and state["step"] == 1
    assert state["row"].shape == (0,) and state["col"].shape == (3,)
    assert math.isfinite(float(state["col"].sum()))


def test_one_workspace_of_the_largest_chunk_is_kept_and_reused_across_updates():
    """The estimator counts one fp32 workspace of the largest update chunk per device, kept by the
    optimizer between updates (a new one per update would churn the allocator)."""
    ps = _params()
    opt = AdaLomo(list(ps.items()), lr=0.05)
    opt.backward(_loss(ps, 0))
    largest = max(p.numel() for p in ps.values() if p.dim() >= 2)
    ((device, buf),) = opt._buffers.items()
    assert device == torch.device("cpu") and buf.dtype == torch.float32 and buf.numel() == largest
    opt.backward(_loss(ps, 1))
    assert list(opt._buffers) == [device] and opt._buffers[device] is buf


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The element counts of the tensors each op creates (outputs that share no storage with an
    input or an ``out=`` argument): what a step allocates beyond what it was given."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []
        self.ops: list[tuple[str, int]] = []  # every op with the size of its first output

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in outs:
            if t.untyped_storage().data_ptr() not in given:
                self.sizes.append((str(func), t.numel()))
        self.ops.append((str(func), outs[0].numel() if outs else 0))
        return out


def _kept_workspace():
    """AdaLomo's own workspace (one buffer per device, kept between updates) and its buffers, from
    an optimizer over a dummy parameter."""
    opt = AdaLomo([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    return opt._workspace, opt._buffers


@pytest.mark.parametrize("chunk_elements", [12, 1 << 20], ids=["3-chunks", "whole"])
def test_a_matrix_update_allocates_nothing_of_a_chunks_size_beyond_its_workspace(chunk_elements):
    """(9, 4) in chunks of 3 rows (or whole): the squares (passes 1-2) and the scaled gradient (pass
    3) are written into the one workspace; every other temporary is a row or column vector."""
    g = torch.Generator().manual_seed(5)
    p, grad = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    workspace, buffers = _kept_workspace()
    state = {}
    _direct(p, grad, state, chunk_elements=chunk_elements, workspace=workspace)  # allocates the state
    expected = p.clone()
    ref_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    _direct(expected, grad, ref_state, chunk_elements=chunk_elements)  # the same step, no workspace
    with _Allocations() as seen:
        _direct(p, grad, state, chunk_elements=chunk_elements, workspace=workspace)
    torch.testing.assert_close(p, expected, rtol=0, atol=0)
    rows = min(9, chunk_elements // 4)
    assert list(buffers[torch.device("cpu")].shape) == [rows * 4]
    assert max(n for _, n in seen.sizes) == 9  # a row statistic
    assert [(op, n) for op, n in seen.sizes if n >= rows * 4] == []


@pytest.mark.parametrize(
    ("chunk_elements", "size", "built", "squared"),
    [(12, 12, 9, 6), (1 << 20, 36, 1, 1)],
    ids=["3-chunks", "whole"],
)
def test_a_single_chunk_builds_and_squares_its_gradient_once(chunk_elements, size, built, squared):
    """A clipped gradient (clip_coef 0.5) is built chunk by chunk (GradientView.chunk copies it).
    Several chunks are rebuilt in each of the three passes and squared in two (nothing chunk-sized
    is kept between passes); one chunk is built and squared once and kept for the passes after."""
    g = torch.Generator().manual_seed(6)
    p, grad = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    workspace, _ = _kept_workspace()
    expected = paper_update(p.clone(), grad * 0.5, {}, lr=0.05, wd=0.1)
    view = GradientView(grad, None, clip_coef=0.5)
    with _Allocations() as seen:
        _direct(p, view, {}, chunk_elements=chunk_elements, workspace=workspace)
    torch.testing.assert_close(p, expected.float(), rtol=1e-5, atol=1e-6)
    copies = [op for op, n in seen.sizes if n == size and op != "aten.empty.memory_format"]
    assert copies == ["aten._to_copy.default"] * built
    assert sum(1 for op, n in seen.ops if n == size and op.startswith("aten.pow")) == squared
