"""PPO / MA-RLHF math (leantune.rl): credit assignment and losses against independent references.

Every expected value here is a closed form, a numpy computation or a plain Python loop written in
this file; the module's own functions are only ever the thing under test.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from leantune.rl.advantages import (
    RANDOM_LENGTHS,
    RunningMoments,
    aggregate,
    gae,
    macro_advantages,
    macro_boundaries,
    masked_whiten,
    token_advantages,
    token_rewards,
)
from leantune.rl.losses import entropy_from_logits, policy_loss, token_logprobs, value_loss

# ---------------------------------------------------------------------------------------------------
# plain-loop references


def ref_gae(rewards, values, gamma, lam):
    """GAE by the textbook recursion in plain Python floats; V after the last step is 0."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        nv = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * nv - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def ref_segments(length, starts):
    ends = list(starts[1:]) + [length]
    return list(zip(starts, ends))


def mask_of(lengths, t):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------------------------------------------
# 1. n = 1 macro GAE is token GAE, bitwise


@pytest.mark.parametrize("agg", ["mean", "position", "last"])
@pytest.mark.parametrize("boundaries", ["ngram1", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_n1_macro_gae_equals_token_gae_bitwise(boundaries, agg, dtype):
    g = torch.Generator().manual_seed(0)
    b, t = 4, 9
    lengths = [9, 5, 1, 7]
    rewards = torch.randn(b, t, generator=g, dtype=dtype)
    values = torch.randn(b, t, generator=g, dtype=dtype)
    mask = mask_of(lengths, t)
    if boundaries == "ngram1":
        starts = [macro_boundaries(n, "ngram", n=1) for n in lengths]
    else:
        starts = [macro_boundaries(n, "none") for n in lengths]
    assert starts == [list(range(n)) for n in lengths]
    for gamma, lam in [(1.0, 0.95), (0.9, 0.95), (0.99, 1.0), (0.7, 0.0)]:
        a_tok, r_tok = token_advantages(rewards, values, mask, gamma, lam)
        a_mac, r_mac = macro_advantages(rewards, values, mask, starts, gamma, lam, how=agg)
        assert torch.equal(a_mac, a_tok)
        assert torch.equal(r_mac, r_tok)
        assert torch.all(a_tok[~mask] == 0) and torch.all(r_tok[~mask] == 0)


def test_token_and_macro_advantages_skip_an_empty_row():
    rewards = torch.ones(2, 4, dtype=torch.float64)
    values = torch.zeros(2, 4, dtype=torch.float64)
    mask = mask_of([4, 0], 4)
    starts = [macro_boundaries(4, "ngram", n=2), macro_boundaries(0, "ngram", n=2)]
    for adv, ret in (
        token_advantages(rewards, values, mask, 1.0, 1.0),
        macro_advantages(rewards, values, mask, starts, 1.0, 1.0),
    ):
        assert torch.all(adv[1] == 0) and torch.all(ret[1] == 0)


# ---------------------------------------------------------------------------------------------------
# 2. GAE: closed form and plain-loop reference


def test_gae_closed_form():
    # torchtune's test: values = rewards = [0, 0, 0, 1]
    g, lam = 0.9, 0.95
    r = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    v = r.clone()
    expected_ret = torch.tensor([g**3 * lam**2, g**2 * lam, g, 1.0], dtype=torch.float64)
    adv, ret = gae(r, v, g, lam)
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-12)
    torch.testing.assert_close(adv, expected_ret - v, rtol=0, atol=1e-12)
    # and the same through the batched entry point, with a padded column
    rb = torch.cat([r, torch.tensor([7.0], dtype=torch.float64)])[None]
    vb = torch.cat([v, torch.tensor([-3.0], dtype=torch.float64)])[None]
    adv_b, ret_b = token_advantages(rb, vb, mask_of([4], 5), g, lam)
    torch.testing.assert_close(ret_b[0, :4], expected_ret, rtol=0, atol=1e-12)
    torch.testing.assert_close(adv_b[0, :4], expected_ret - v, rtol=0, atol=1e-12)
    assert ret_b[0, 4] == 0 and adv_b[0, 4] == 0


@pytest.mark.parametrize(
    "gamma,lam", [(1.0, 0.95), (0.9, 0.95), (0.99, 0.9), (1.0, 1.0), (0.8, 1.0), (0.9, 0.0)]
)
def test_gae_matches_plain_loop(gamma, lam):
    rng = np.random.default_rng(1)
    lengths = [11, 6, 1, 3]
    t = 11
    rewards = rng.standard_normal((4, t))
    values = rng.standard_normal((4, t))
    adv, ret = token_advantages(
        torch.from_numpy(rewards), torch.from_numpy(values), mask_of(lengths, t), gamma, lam
    )
    for b, n in enumerate(lengths):
        a_ref, r_ref = ref_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        np.testing.assert_allclose(adv[b, :n].numpy(), a_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(ret[b, :n].numpy(), r_ref, rtol=0, atol=1e-12)
        assert np.all(adv[b, n:].numpy() == 0) and np.all(ret[b, n:].numpy() == 0)


def test_gae_lambda_one_gamma_one_is_reward_to_go():
    rng = np.random.default_rng(2)
    r = rng.standard_normal(8)
    v = rng.standard_normal(8)
    _, ret = gae(torch.from_numpy(r), torch.from_numpy(v), 1.0, 1.0)
    np.testing.assert_allclose(ret.numpy(), np.cumsum(r[::-1])[::-1], rtol=0, atol=1e-12)


def test_gae_lambda_one_is_discounted_reward_to_go():
    rng = np.random.default_rng(3)
    r = rng.standard_normal(8)
    v = rng.standard_normal(8)
    gamma = 0.9
    _, ret = gae(torch.from_numpy(r), torch.from_numpy(v), gamma, 1.0)
    expected = [sum(gamma ** (k - t) * r[k] for k in range(t, 8)) for t in range(8)]
    np.testing.assert_allclose(ret.numpy(), expected, rtol=0, atol=1e-12)


def test_gae_lambda_zero_is_one_step_td():
    rng = np.random.default_rng(4)
    r = rng.standard_normal(8)
    v = rng.standard_normal(8)
    gamma = 0.9
    adv, _ = gae(torch.from_numpy(r), torch.from_numpy(v), gamma, 0.0)
    v_next = np.append(v[1:], 0.0)
    np.testing.assert_allclose(adv.numpy(), r + gamma * v_next - v, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# 3. macro-action boundaries


def test_ngram_boundaries():
    assert macro_boundaries(10, "ngram", n=3) == [0, 3, 6, 9]  # 9: a cut and the final singleton
    assert macro_boundaries(11, "ngram", n=3) == [0, 3, 6, 9, 10]
    assert macro_boundaries(1, "ngram", n=3) == [0]
    assert macro_boundaries(0, "ngram", n=3) == []
    for length in (2, 5, 7):
        for n in (length, length + 1, 100):
            assert macro_boundaries(length, "ngram", n=n) == [0, length - 1]
    assert macro_boundaries(5, "ngram", n=1) == [0, 1, 2, 3, 4]
    assert macro_boundaries(5, "none", n=4) == [0, 1, 2, 3, 4]  # none ignores n


def test_boundaries_reject_bad_arguments():
    with pytest.raises(ValueError):
        macro_boundaries(5, "ngram", n=0)
    with pytest.raises(ValueError):
        macro_boundaries(5, "ngram", n=-2)
    with pytest.raises(ValueError):
        macro_boundaries(5, "words")


@pytest.mark.parametrize("length", [1, 2, 4, 9, 17, 40, 63, 64, 65, 100])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_boundaries(length, seed):
    s = macro_boundaries(length, "random", rng=random.Random(seed))
    assert s == macro_boundaries(length, "random", rng=random.Random(seed))  # same seed, same cut
    assert s[0] == 0 and s[-1] == length - 1
    assert all(a < b for a, b in zip(s, s[1:]))
    sizes = [e - b for b, e in ref_segments(length, s)]
    assert sum(sizes) == length and sizes[-1] == 1
    drawn = sizes[:-2]  # all but the remainder and the final singleton
    assert all(k in RANDOM_LENGTHS for k in drawn)
    assert set(RANDOM_LENGTHS) == {1, 2, 3, 5, 10}
    for k in set(drawn):  # drawn without replacement from RANDOM_LENGTHS * 3
        assert drawn.count(k) <= 3


def test_random_boundaries_follow_a_shuffled_pool():
    # the drawn lengths are the prefix of (1, 2, 3, 5, 10) * 3 shuffled by the rng
    pool = [k for k in (1, 2, 3, 5, 10) for _ in range(3)]
    random.Random(5).shuffle(pool)
    length = 200  # longer than the pool's 63 tokens: all 15 drawn, then a remainder
    s = macro_boundaries(length, "random", rng=random.Random(5))
    expected = [0]
    for k in pool:
        expected.append(expected[-1] + k)
    assert s == expected + [length - 1]


def test_random_boundaries_differ_across_seeds():
    cuts = {tuple(macro_boundaries(60, "random", rng=random.Random(seed))) for seed in range(10)}
    assert len(cuts) > 1


def test_ppl_boundaries():
    assert macro_boundaries(7, "ppl", ppl=[5, 4, 4, 6, 3, 2, 7]) == [0, 3, 6]
    assert macro_boundaries(4, "ppl", ppl=[4, 3, 2, 1]) == [0, 3]  # non-increasing: one run + last
    assert macro_boundaries(4, "ppl", ppl=[1, 2, 3, 4]) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        macro_boundaries(7, "ppl", ppl=[5, 4, 4])
    with pytest.raises(ValueError):
        macro_boundaries(3, "ppl")


# ---------------------------------------------------------------------------------------------------
# 4. aggregation


@pytest.mark.parametrize("how", ["mean", "position", "last"])
def test_aggregate_matches_numpy(how):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(12)
    starts = [0, 3, 4, 9, 11]
    got = aggregate(torch.from_numpy(x), starts, how).numpy()
    expected = []
    for b, e in ref_segments(12, starts):
        seg = x[b:e]
        if how == "mean":
            expected.append(np.mean(seg))
        elif how == "position":
            w = np.array([1.0 / (i + 1) for i in range(len(seg))])
            expected.append(np.sum(seg * w / w.sum()))
        else:
            expected.append(seg[-1])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("how", ["mean", "position", "last"])
def test_aggregate_singletons_are_bitwise(how):
    x = torch.randn(6, generator=torch.Generator().manual_seed(6))
    starts = [0, 1, 3, 4, 5]  # singletons at 0, 3, 4, 5
    got = aggregate(x, starts, how)
    for k, i in [(0, 0), (2, 3), (3, 4), (4, 5)]:
        assert torch.equal(got[k], x[i])
    assert torch.equal(aggregate(x, list(range(6)), how), x)


def test_aggregate_rejects_unknown_weighting():
    with pytest.raises(ValueError):
        aggregate(torch.zeros(4), [0, 3], "median")


# ---------------------------------------------------------------------------------------------------
# 5. macro GAE against a hand-written loop


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_macro_advantages_n3_plain_loop(gamma, lam):
    rng = np.random.default_rng(7)
    t, n = 12, 10
    r = rng.standard_normal(t)
    v = rng.standard_normal(t)
    starts = macro_boundaries(n, "ngram", n=3)
    assert starts == [0, 3, 6, 9]
    segs = [(0, 3), (3, 6), (6, 9), (9, 10)]
    # aggregate by mean
    rm = [sum(r[i] for i in range(b, e)) / (e - b) for b, e in segs]
    vm = [sum(v[i] for i in range(b, e)) / (e - b) for b, e in segs]
    # GAE over the macro steps, by hand
    k = len(segs)
    a_m = [0.0] * k
    running = 0.0
    for j in range(k - 1, -1, -1):
        nxt = vm[j + 1] if j + 1 < k else 0.0
        running = (rm[j] + gamma * nxt - vm[j]) + gamma * lam * running
        a_m[j] = running
    r_m = [a_m[j] + vm[j] for j in range(k)]
    # broadcast to tokens
    a_tok = [0.0] * t
    r_tok = [0.0] * t
    for j, (b, e) in enumerate(segs):
        for i in range(b, e):
            a_tok[i], r_tok[i] = a_m[j], r_m[j]
    mask = mask_of([n], t)
    adv, ret = macro_advantages(
        torch.from_numpy(r)[None], torch.from_numpy(v)[None], mask, [starts], gamma, lam, how="mean"
    )
    np.testing.assert_allclose(adv[0].numpy(), a_tok, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ret[0].numpy(), r_tok, rtol=0, atol=1e-12)


def test_macro_advantages_batch_rows_are_independent():
    rng = np.random.default_rng(8)
    lengths = [10, 4, 0, 7]
    t = 10
    r = rng.standard_normal((4, t))
    v = rng.standard_normal((4, t))
    starts = [macro_boundaries(n, "ngram", n=3) for n in lengths]
    adv, ret = macro_advantages(
        torch.from_numpy(r), torch.from_numpy(v), mask_of(lengths, t), starts, 0.95, 0.9
    )
    for b, n in enumerate(lengths):
        segs = ref_segments(n, starts[b])
        rm = [float(np.mean(r[b, s:e])) for s, e in segs]
        vm = [float(np.mean(v[b, s:e])) for s, e in segs]
        a_m, r_m = ref_gae(rm, vm, 0.95, 0.9)
        a_tok = [a for (s, e), a in zip(segs, a_m) for _ in range(s, e)] + [0.0] * (t - n)
        r_tok = [x for (s, e), x in zip(segs, r_m) for _ in range(s, e)] + [0.0] * (t - n)
        np.testing.assert_allclose(adv[b].numpy(), a_tok, rtol=0, atol=1e-12)
        np.testing.assert_allclose(ret[b].numpy(), r_tok, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# 6. PPO clipped surrogate


OLD = torch.tensor([0.5, 0.8, 1.2], dtype=torch.float64)
FULL = torch.ones(3, dtype=torch.bool)


def test_policy_loss_ratio_e_positive_advantage_is_clipped():
    loss, stats = policy_loss(OLD + 1, OLD, torch.ones(3, dtype=torch.float64), FULL, clip=0.2)
    assert math.isclose(loss.item(), -1.2, abs_tol=1e-12)
    assert stats["clipfrac"].item() == 1.0
    assert stats["approx_kl"].item() > 0


def test_policy_loss_ratio_inverse_e_negative_advantage_is_clipped():
    loss, stats = policy_loss(OLD - 1, OLD, -torch.ones(3, dtype=torch.float64), FULL, clip=0.2)
    assert math.isclose(loss.item(), 0.8, abs_tol=1e-12)
    assert stats["clipfrac"].item() == 1.0


def test_policy_loss_ratio_inverse_e_positive_advantage_takes_unclipped_side():
    loss, stats = policy_loss(OLD - 1, OLD, torch.ones(3, dtype=torch.float64), FULL, clip=0.2)
    assert math.isclose(loss.item(), -1 / math.e, abs_tol=1e-12)
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_without_clip_is_plain_surrogate():
    rng = np.random.default_rng(9)
    old = rng.standard_normal(6)
    new = old + rng.standard_normal(6)
    a = rng.standard_normal(6)
    loss, stats = policy_loss(
        torch.from_numpy(new),
        torch.from_numpy(old),
        torch.from_numpy(a),
        torch.ones(6, dtype=torch.bool),
        None,
    )
    assert math.isclose(loss.item(), float(np.mean(-a * np.exp(new - old))), abs_tol=1e-12)
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_matches_numpy_reference_with_mask():
    rng = np.random.default_rng(10)
    b, t = 3, 7
    old = rng.standard_normal((b, t))
    new = old + 0.5 * rng.standard_normal((b, t))
    a = rng.standard_normal((b, t))
    mask = mask_of([7, 3, 5], t).numpy()
    # garbage outside the mask
    new_g, old_g, a_g = new.copy(), old.copy(), a.copy()
    new_g[~mask], old_g[~mask], a_g[~mask] = 50.0, -50.0, 1e6
    loss, stats = policy_loss(
        torch.from_numpy(new_g), torch.from_numpy(old_g), torch.from_numpy(a_g), torch.from_numpy(mask), 0.2
    )
    rho = np.exp(new - old)
    unc = -a * rho
    clp = -a * np.clip(rho, 0.8, 1.2)
    assert math.isclose(loss.item(), float(np.maximum(unc, clp)[mask].mean()), abs_tol=1e-12)
    # clipfrac is computed in float32 (a diagnostic), whatever the inputs' dtype
    assert math.isclose(stats["clipfrac"].item(), float((clp > unc)[mask].mean()), abs_tol=1e-7)
    kl = (rho - 1) - (new - old)
    assert math.isclose(stats["approx_kl"].item(), float(kl[mask].mean()), abs_tol=1e-12)


def test_policy_loss_ignores_masked_positions():
    mask = torch.tensor([True, True, True, False, False])
    old = torch.tensor([0.5, 0.8, 1.2, 3.0, -4.0], dtype=torch.float64)
    new = old.clone()
    new[:3] += 1
    new[3:] = torch.tensor([90.0, -90.0], dtype=torch.float64)  # garbage
    adv = torch.tensor([1.0, 1.0, 1.0, 1e9, -1e9], dtype=torch.float64)
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    assert math.isclose(loss.item(), -1.2, abs_tol=1e-12)
    assert stats["clipfrac"].item() == 1.0


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    old = torch.zeros(2, dtype=torch.float64)
    new = torch.tensor([1.0, 0.05], dtype=torch.float64, requires_grad=True)  # ratio e (clipped), ~1.05
    adv = torch.ones(2, dtype=torch.float64)
    loss, _ = policy_loss(new, old, adv, torch.ones(2, dtype=torch.bool), clip=0.2)
    loss.backward()
    assert new.grad[0].item() == 0.0
    assert math.isclose(new.grad[1].item(), -math.exp(0.05) / 2, rel_tol=1e-12)


def test_approx_kl_zero_at_ratio_one_positive_otherwise():
    x = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    a = torch.ones(3, dtype=torch.float64)
    _, stats = policy_loss(x, x.clone(), a, FULL)
    assert stats["approx_kl"].item() == 0.0
    for d in (-0.5, -1e-3, 1e-3, 0.5):
        _, stats = policy_loss(x + d, x, a, FULL)
        k = math.exp(d) - 1 - d
        assert stats["approx_kl"].item() > 0
        assert math.isclose(stats["approx_kl"].item(), k, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 7. value loss


def test_value_loss_clipped_closed_form():
    one = torch.ones(1, dtype=torch.bool)
    loss, stats = value_loss(
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor([0.0], dtype=torch.float64),
        torch.tensor([2.0], dtype=torch.float64),
        one,
        clip=0.2,
    )
    assert math.isclose(loss.item(), 0.5 * 3.24, abs_tol=1e-12)
    assert stats["vf_clipfrac"].item() == 1.0


def test_value_loss_clip_not_binding():
    # new value within the clip range of old: both errors equal, nothing counted clipped
    loss, stats = value_loss(
        torch.tensor([0.1], dtype=torch.float64),
        torch.tensor([0.0], dtype=torch.float64),
        torch.tensor([2.0], dtype=torch.float64),
        torch.ones(1, dtype=torch.bool),
        clip=0.2,
    )
    assert math.isclose(loss.item(), 0.5 * 1.9**2, abs_tol=1e-12)
    assert stats["vf_clipfrac"].item() == 0.0


def test_value_loss_matches_numpy_with_mask():
    rng = np.random.default_rng(11)
    v, ov, r = (rng.standard_normal((2, 6)) for _ in range(3))
    mask = mask_of([6, 2], 6).numpy()
    vg = v.copy()
    vg[~mask] = 1e6
    tens = [torch.from_numpy(a) for a in (vg, ov, r)]
    loss, stats = value_loss(*tens, torch.from_numpy(mask), clip=0.3)
    vc = ov + np.clip(v - ov, -0.3, 0.3)
    e1, e2 = (v - r) ** 2, (vc - r) ** 2
    assert math.isclose(loss.item(), 0.5 * float(np.maximum(e1, e2)[mask].mean()), abs_tol=1e-12)
    assert math.isclose(stats["vf_clipfrac"].item(), float((e2 > e1)[mask].mean()), abs_tol=1e-7)
    loss_none, stats_none = value_loss(*tens, torch.from_numpy(mask), clip=None)
    assert math.isclose(loss_none.item(), 0.5 * float(e1[mask].mean()), abs_tol=1e-12)
    assert stats_none["vf_clipfrac"].item() == 0.0


# ---------------------------------------------------------------------------------------------------
# 8. running moments


def test_running_moments_match_numpy():
    rng = np.random.default_rng(12)
    batches = [rng.standard_normal(k) * 3 + 2 for k in (5, 1, 17, 2, 1, 40)]
    rm = RunningMoments()
    assert rm.std == 1.0
    seen = []
    for i, x in enumerate(batches):
        rm.update(torch.from_numpy(x).float() if i == 2 else torch.from_numpy(x))
        seen.extend(x.astype(np.float32).astype(np.float64) if i == 2 else x)
        allv = np.array(seen)
        assert rm.count == len(allv)
        assert abs(rm.mean - np.mean(allv)) < 1e-12
        if len(allv) >= 2:
            assert abs(rm.std - np.std(allv, ddof=1)) < 1e-12
        else:
            assert rm.std == 1.0


def test_running_moments_std_is_one_before_two_values():
    rm = RunningMoments()
    assert rm.std == 1.0
    rm.update(torch.tensor([5.0]))
    assert rm.std == 1.0 and rm.mean == 5.0
    rm.update(torch.tensor([], dtype=torch.float64))
    assert rm.count == 1
    rm.update(torch.tensor([7.0]))
    assert math.isclose(rm.std, math.sqrt(2.0), rel_tol=1e-15)


def test_running_moments_state_round_trip():
    rng = np.random.default_rng(13)
    a = RunningMoments()
    for k in (3, 1, 8):
        a.update(torch.from_numpy(rng.standard_normal(k)))
    b = RunningMoments()
    b.load_state_dict(a.state_dict())
    assert (b.mean, b.var, b.count, b.std) == (a.mean, a.var, a.count, a.std)
    for k in (4, 1, 9):
        x = torch.from_numpy(rng.standard_normal(k))
        a.update(x)
        b.update(x)
        assert (b.mean, b.var, b.count, b.std) == (a.mean, a.var, a.count, a.std)


# ---------------------------------------------------------------------------------------------------
# 9. token rewards (KL penalty and score)


def test_token_rewards_kl_sign_and_score_placement():
    b, t = 4, 6
    lengths = [6, 3, 0, 1]
    mask = mask_of(lengths, t)
    g = torch.Generator().manual_seed(14)
    ref = torch.randn(b, t, generator=g, dtype=torch.float64)
    logp = ref + torch.rand(b, t, generator=g, dtype=torch.float64) + 0.1  # logp > ref everywhere
    logp[~mask] = 123.0  # garbage outside the mask
    score = torch.tensor([2.0, -1.5, 9.0, 0.25], dtype=torch.float64)
    kl_coef = 0.05
    out = token_rewards(logp, ref, score, mask, kl_coef)
    for row, n in enumerate(lengths):
        for i in range(t):
            if i >= n:
                assert out[row, i].item() == 0.0
                continue
            kl = -kl_coef * (logp[row, i].item() - ref[row, i].item())
            assert kl < 0
            expected = kl + (score[row].item() if i == n - 1 else 0.0)
            assert math.isclose(out[row, i].item(), expected, abs_tol=1e-12)
    assert torch.all(out[2] == 0)  # the empty row got no score and no crash
    # inputs untouched
    assert torch.all(logp[~mask] == 123.0)


def test_token_rewards_zero_kl_coef_is_score_only():
    mask = mask_of([3, 2], 4)
    logp = torch.randn(2, 4, generator=torch.Generator().manual_seed(15))
    out = token_rewards(logp, logp - 1, torch.tensor([1.0, 2.0]), mask, 0.0)
    expected = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------
# 10. masked whitening


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_numpy(shift_mean):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((3, 8)) * 4 + 1.5
    mask = mask_of([8, 5, 2], 8).numpy()
    xg = x.copy()
    xg[~mask] = 1e3  # garbage outside the mask
    out = masked_whiten(torch.from_numpy(xg), torch.from_numpy(mask), shift_mean=shift_mean).numpy()
    vals = x[mask]
    mean = vals.mean()
    var = vals.var(ddof=1)
    expected = (x - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        expected = expected + mean
    expected[~mask] = 0.0
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert np.all(out[~mask] == 0)
    if shift_mean:
        assert abs(out[mask].mean()) < 1e-12
        assert abs(out[mask].std(ddof=1) - 1) < 1e-6
    else:
        assert abs(out[mask].mean() - mean) < 1e-12


# ---------------------------------------------------------------------------------------------------
# 11. log-probs and entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_token_logprobs_match_log_softmax_gather(dtype):
    g = torch.Generator().manual_seed(17)
    logits = (torch.randn(2, 5, 33, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, 33, (2, 5), generator=g)
    got = token_logprobs(logits, tokens)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.log_softmax(logits.to(ref_dtype), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got.to(ref_dtype), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_categorical(dtype):
    g = torch.Generator().manual_seed(18)
    logits = (torch.randn(3, 4, 29, generator=g) * 3).to(dtype)
    logits[0, 0] = 0.0  # uniform: log V
    logits[0, 1, 0] = 60.0  # nearly one-hot: ~0
    got = entropy_from_logits(logits)
    expected = torch.distributions.Categorical(logits=logits.float()).entropy()
    p = torch.softmax(logits.double(), -1)
    by_hand = -(p * torch.log(p)).sum(-1)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), by_hand, rtol=1e-5, atol=1e-5)
    assert math.isclose(got[0, 0].item(), math.log(29), rel_tol=1e-6)
    assert 0 <= got[0, 1].item() < 1e-5


def test_entropy_with_masked_vocabulary_entries():
    logits = torch.tensor([[0.0, 0.0, -math.inf], [1.0, -math.inf, -math.inf]])
    got = entropy_from_logits(logits)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, torch.tensor([math.log(2), 0.0]))


def test_masked_whiten_single_masked_value_is_finite():
    out = masked_whiten(torch.tensor([3.0, 5.0]), torch.tensor([True, False]))
    assert torch.all(torch.isfinite(out)) and torch.all(out == 0)
