"""Stochastic rounding and Kahan compensation when writing fp32 updates to bf16/fp16 weights."""

from __future__ import annotations

import math

import pytest
import torch

from leantune.optim import LOMO, AdaLomo, InBackward, stochastic_round
from leantune.optim.precision import NoiseTable
from tests.helpers import batch, loss_of, tiny_llama

LOW = [torch.bfloat16, torch.float16]


def ulp_above(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    near = x.to(dtype)
    down, up = (torch.tensor(v, dtype=dtype, device=x.device) for v in (-math.inf, math.inf))
    lo = torch.where(near.float() > x, torch.nextafter(near, down), near)
    hi = torch.nextafter(lo, up)
    return lo.float(), hi.float()


@pytest.mark.parametrize("source", ["randint", "table"])
@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_is_unbiased_within_a_statistical_bound(dtype, source, device):
    g = torch.Generator().manual_seed(0)
    # the same values on every device; the noise is drawn on the device (its generator)
    x = (torch.randn(512, generator=g) * torch.logspace(-3, 3, 512)).to(device=device, dtype=torch.float32)
    lo, hi = ulp_above(x, dtype)
    assert torch.all((lo <= x) & (x <= hi))
    n = 4000
    gen = torch.Generator(device=device).manual_seed(1)
    # "table": the optimizers' source, a seeded table read at random offsets.
    noise = NoiseTable(0, device, gen) if source == "table" else None
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(n):
        r = stochastic_round(x.clone(), dtype, gen, noise=noise).float()
        assert torch.all((r == lo) | (r == hi))  # only the two neighbours are ever produced
        total += r.double()
    mean = total / n
    # Each draw is a Bernoulli between lo and hi: std of the mean <= (hi - lo) / (2 sqrt(n)).
    bound = 5 * (hi - lo).double() / (2 * math.sqrt(n))
    assert torch.all((mean - x.double()).abs() <= bound)
    # ...and it is not merely round-to-nearest: the mean lies strictly between the neighbours
    # for values that are not close to either.
    frac = ((x - lo) / (hi - lo)).double()
    middle = (frac > 0.2) & (frac < 0.8)
    assert middle.sum() > 100
    assert torch.all((mean[middle] > lo[middle].double()) & (mean[middle] < hi[middle].double()))


@pytest.mark.parametrize("dtype", LOW)
def test_representable_values_and_infinities_stay_exact(dtype, device):
    x = torch.randn(1000, device=device).to(dtype).float()
    x = torch.cat([x, torch.tensor([0.0, -0.0, math.inf, -math.inf, 1.0, -2.0], device=device)])
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(20):
        assert torch.equal(stochastic_round(x.clone(), dtype, gen).float(), x)


def test_stochastic_rounding_rejects_non_fp32_input():
    with pytest.raises(TypeError, match="expects an fp32 tensor"):
        stochastic_round(torch.ones(3, dtype=torch.float16), torch.bfloat16)


def constant_update_run(rounding: str, dtype: torch.dtype, steps: int, lr: float = 1e-4, device="cpu"):
    """A bf16/fp16 weight of 1.0 receiving ``-lr`` per step (gradient 1): far below half an ulp."""
    w = torch.nn.Parameter(torch.ones(256, dtype=dtype, device=device))
    opt = LOMO([w], lr=lr, rounding=rounding, seed=7)
    for _ in range(steps):
        opt.backward(w.float().sum())
    return w.detach().float()


@pytest.mark.parametrize("dtype", LOW)
def test_tiny_constant_updates_survive_stochastic_and_kahan_but_not_nearest(dtype, device):
    one = torch.tensor(1.0, dtype=dtype)
    ulp = (one.float() - torch.nextafter(one, torch.tensor(0.0, dtype=dtype)).float()).item()  # just below 1
    steps, lr = 500, ulp / 40  # each update is a twentieth of half an ulp: nearest drops it
    expected = 1.0 - steps * lr  # 12.5 ulps below 1
    nearest = constant_update_run("nearest", dtype, steps, lr, device)
    assert torch.all(nearest == 1.0)
    stochastic = constant_update_run("stochastic", dtype, steps, lr, device)
    assert abs(stochastic.mean().item() - expected) < 1.5 * ulp
    kahan = constant_update_run("kahan", dtype, steps, lr, device)
    assert torch.all((kahan - expected).abs() <= ulp)


def test_same_seed_same_result_other_seed_other_result(device):
    def run(seed):
        model = tiny_llama(dtype=torch.bfloat16, device=device)
        opt = AdaLomo(model, rounding="stochastic", seed=seed)
        for s in range(3):
            opt.backward(loss_of(model, batch(s)))
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_bf16_adalomo_changes_far_more_weights_with_stochastic_rounding(device):
    fractions = {}
    for rounding in ("nearest", "stochastic", "kahan"):
        model = tiny_llama(dtype=torch.bfloat16, device=device)
        before = [p.detach().clone() for p in model.parameters()]
        AdaLomo(model, lr=1e-4, rounding=rounding).backward(loss_of(model, batch(0)))
        changed = sum((a != b).sum().item() for a, b in zip(before, model.parameters()))
        fractions[rounding] = changed / sum(p.numel() for p in model.parameters())
    assert fractions["nearest"] < 0.2
    assert fractions["stochastic"] > 2 * fractions["nearest"]
    assert fractions["kahan"] <= fractions["stochastic"] + 1e-9  # kahan defers, it does not add noise


def test_kahan_buffer_is_in_the_weight_dtype_and_only_for_low_precision(device):
    low = tiny_llama(dtype=torch.bfloat16, device=device)
    opt = LOMO(low, rounding="kahan")
    opt.backward(loss_of(low, batch(0)))
    bufs = [st["kahan"] for st in opt.state.values()]
    assert bufs and all(b.dtype == torch.bfloat16 and b.device.type == device.type for b in bufs)
    full = tiny_llama(device=device)
    opt32 = LOMO(full, rounding="kahan")
    opt32.backward(loss_of(full, batch(0)))
    assert not any("kahan" in st for st in opt32.state.values())


def test_rounding_is_a_no_op_for_fp32_weights(device):
    a, b = tiny_llama(device=device), tiny_llama(device=device)
    AdaLomo(a, rounding="nearest").backward(loss_of(a, batch(0)))
    AdaLomo(b, rounding="stochastic").backward(loss_of(b, batch(0)))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
def test_in_backward_adamw_uses_the_rounding_mode_on_bf16_weights(rounding, device):
    # A constant gradient makes every AdamW step move the weight by ~lr (m / sqrt(v) = 1).
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    ulp = (one.float() - torch.nextafter(one, torch.tensor(0.0, dtype=torch.bfloat16)).float()).item()
    steps, lr = 300, ulp / 40
    w = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16, device=device))
    opt = InBackward(torch.optim.AdamW, [w], lr=lr, weight_decay=0.0, rounding=rounding)
    for _ in range(steps):
        opt.backward(w.float().sum())
    moved = 1.0 - w.float().mean().item()
    if rounding == "nearest":
        assert moved == 0.0
    else:
        assert abs(moved - steps * lr) < 1.5 * ulp
        assert opt.state[w]["exp_avg"].dtype == torch.float32  # updated on an fp32 copy


def test_chunked_stochastic_update_matches_the_expected_mean(device):
    # Chunking splits the update into row blocks; every block must be rounded and written back.
    w = torch.nn.Parameter(torch.ones(64, 32, dtype=torch.bfloat16, device=device))
    opt = LOMO([w], lr=1e-4, rounding="stochastic")
    opt.chunk_elements = 100  # 3 rows per chunk
    for _ in range(300):
        opt.backward(w.float().sum())
    assert abs(w.float().mean().item() - 0.97) < 2e-3
