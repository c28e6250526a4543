"""Speculative decoding (leantune.speculative): the acceptance math on constructed distributions,
greedy identity with plain decoding and transformers' assisted generation, sampling fidelity
against the target's exact probabilities, KV-cache rollback, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from leantune.speculative import (
    DraftError,
    IncompatibleDraftError,
    Sampling,
    VirtualClock,
    ar_generate,
    check_compatible,
    duo_generate,
    gamma_star,
    profile_models,
    sd_generate,
)
from leantune.speculative.duo import num_sequences, snap_k
from leantune.speculative.sampling import (
    accept_or_resample,
    choose_sequence,
    output_distribution,
    processed_probs,
    residual,
    verify_tokens,
)
from tests.helpers import tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair():
    """A 3-layer target and a 1-layer draft, different seeds, shared vocabulary of 48."""
    return tiny_llama(0, layers=3), tiny_llama(1, layers=1)


def _prompts(n: int, seed: int = 0, vocab: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (int(torch.randint(1, 10, (), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


# -- the math, on constructed distributions -----------------------------------------------------


def _cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    for _ in range(20):
        p, q = torch.distributions.Dirichlet(torch.full((7,), 0.3, dtype=torch.float64)).sample((2,))
        out.append((p / p.sum(), q / q.sum()))
    p = torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64)
    out.append((p, torch.tensor([0, 0, 0.5, 0.5], dtype=torch.float64)))  # disjoint supports
    out.append((p, p.clone()))  # identical: never rejected
    out.append((p, torch.tensor([0, 1.0, 0, 0], dtype=torch.float64)))  # one-hot (greedy) draft
    out.append(
        (torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.full((4,), 0.25, dtype=torch.float64))
    )
    return out


def test_output_distribution_equals_target_exactly():
    """P(out=x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) residual(x) = p(x)."""
    for p, q in _cases():
        torch.testing.assert_close(output_distribution(p, q), p, atol=1e-12, rtol=0)


def test_residual_of_one_hot_draft_is_p_without_the_token():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.zeros(4, dtype=torch.float64)
    q[2] = 1.0
    expect = torch.tensor([0.1, 0.2, 0.0, 0.4], dtype=torch.float64) / 0.7
    torch.testing.assert_close(residual(p, q), expect)


def test_accept_or_resample_draws_follow_p():
    """The sampler (not just the formula): 40k draws of x ~ q then accept-or-resample follow p
    within 5 standard errors per cell."""
    p = torch.tensor([0.05, 0.6, 0.05, 0.3], dtype=torch.float64)
    q = torch.tensor([0.4, 0.1, 0.4, 0.1], dtype=torch.float64)
    s = Sampling(do_sample=True)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    counts = torch.zeros(4, dtype=torch.float64)
    xs = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    for x in xs:
        counts[accept_or_resample(p, q, x, s, g)[1]] += 1
    se = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 5 * se).all(), (counts / n, p)


def test_greedy_acceptance_is_argmax_agreement():
    p_rows = torch.eye(5, dtype=torch.float64)[[1, 3, 4, 0]]  # argmax 1, 3, 4, 0
    g = Sampling()
    assert verify_tokens(p_rows[:3], None, [1, 3, 4], g) == (3, None)
    assert verify_tokens(p_rows[:3], None, [1, 2, 4], g) == (1, 3)
    assert verify_tokens(p_rows[:3], None, [0, 3, 4], g) == (0, 1)


def test_processed_probs_match_transformers_warpers():
    """Temperature, top-k and top-p as transformers' generate applies them (same on p and q)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(0))
    for t, k, top_p in [(0.7, 0, 0.9), (1.3, 5, 1.0), (0.5, 10, 0.5)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        got = processed_probs(logits, Sampling(True, t, top_p, k))
        torch.testing.assert_close(got, torch.softmax(ref.double(), -1), atol=1e-6, rtol=0)
    one_hot = processed_probs(logits, Sampling())
    assert (one_hot.argmax(-1) == logits.argmax(-1)).all() and (one_hot.sum(-1) == 1).all()


def test_choose_sequence_draws_from_target_and_picks_matching_sequence():
    p = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    assert choose_sequence(p, [2, 1], Sampling()) == (1, 1)
    assert choose_sequence(p, [2, 0], Sampling()) == (1, None)
    g = torch.Generator().manual_seed(0)
    n = 20_000
    picks = [choose_sequence(p, [1, 2, 1], Sampling(True), g) for _ in range(n)]
    freq = torch.tensor([sum(t == i for t, _ in picks) / n for i in range(3)], dtype=torch.float64)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all()
    assert {(t, j) for t, j in picks} == {(0, None), (1, 0), (2, 1)}  # first sequence starting with t


def test_multi_sequence_count_and_snapping():
    # theta = 0.4 * 0.5 = 0.2: ranks 2 (0.3) and 3 (0.25) pass, rank 4 (0.05) stops the count
    p1 = torch.tensor([0.4, 0.3, 0.25, 0.05], dtype=torch.float64)
    assert num_sequences(p1, 0.5) == 3
    assert num_sequences(p1, 0.9) == 1  # theta 0.36: a confident path drafts one sequence
    peaked = torch.tensor([0.01] * 10 + [0.9], dtype=torch.float64)
    assert num_sequences(peaked, 0.9) == 1
    flat = torch.full((20,), 0.05, dtype=torch.float64)
    assert num_sequences(flat, 0.5) == 8  # capped at 8
    # the reference's table
    assert [snap_k(k, 24) for k in range(1, 9)] == [1, 2, 3, 4, 4, 6, 6, 8]
    assert [snap_k(k, 16) for k in range(1, 9)] == [1, 2, 2, 4, 4, 4, 4, 8]
    assert [snap_k(k, 12) for k in range(1, 9)] == [1, 2, 3, 4, 4, 6, 6, 6]
    assert snap_k(5, 1) == 1


def test_gamma_star_and_virtual_clock():
    assert gamma_star(10.0, 1.0) == 10
    assert gamma_star(10.0, 3.0) == 3
    assert gamma_star(0.5, 1.0) == 1
    c = VirtualClock.ratio(10, draft_cost=1.0)
    c.charge("draft")
    c.charge("draft")
    c.charge("target", 5)
    assert c.sync() == 10.0  # concurrent lanes: the slower one
    c.charge("draft", 1)
    assert c.now == 11.0


# -- models: greedy identity, caches, fidelity, errors ------------------------------------------


def test_greedy_identical_to_ar_generate_and_assisted(pair):
    """50 prompts: the target's own greedy loop, model.generate, transformers' assisted generation,
    SD (gamma 3) and DuoDecoding (gamma 8 and 6) give the same tokens."""
    target, draft = pair
    n_new = 12
    for i, p in enumerate(_prompts(50)):
        x = torch.tensor([p])
        kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False, eos_token_id=None)
        ref = target.generate(input_ids=x, pad_token_id=0, **kw)[0, len(p) :].tolist()
        ar = ar_generate(target, p, max_new_tokens=n_new).tokens
        sd = sd_generate(target, draft, p, max_new_tokens=n_new, gamma=3).tokens
        duo = duo_generate(target, draft, p, max_new_tokens=n_new, gamma=8 if i % 2 else 6).tokens
        assert ar == ref == sd == duo, (i, p)
        if i < 15:  # assisted generation is the slowest of them
            hf = target.generate(input_ids=x, pad_token_id=0, assistant_model=draft, **kw)[0, len(p) :]
            assert hf.tolist() == ref, (i, p)


def test_greedy_stops_at_eos_and_self_draft_accepts_everything(pair):
    target, draft = pair
    p = _prompts(1, seed=3)[0]
    full = ar_generate(target, p, max_new_tokens=20).tokens
    eos = full[5]
    cut = full[: full.index(eos)]
    for fn in (
        lambda: ar_generate(target, p, max_new_tokens=20, eos_id=eos),
        lambda: sd_generate(target, draft, p, max_new_tokens=20, eos_id=eos, gamma=4),
        lambda: duo_generate(target, draft, p, max_new_tokens=20, eos_id=eos, gamma=4),
    ):
        assert fn().tokens == cut
    same = sd_generate(target, target, p, max_new_tokens=20, gamma=4)
    assert same.tokens == full and same.stats.acceptance_rate == 1.0
    duo_same = duo_generate(target, target, p, max_new_tokens=20, gamma=4)
    assert duo_same.tokens == full and duo_same.stats.acceptance_rate == 1.0


def _fresh_kv(model, ids: list[int]):
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    return out.cache


def _assert_cache_is_prefill(cache, model, ids: list[int]) -> None:
    fresh = _fresh_kv(model, ids)
    assert cache.get_seq_length() == len(ids)
    for a, b in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["sd", "duo"])
def test_caches_after_rollback_equal_fresh_prefill(pair, method):
    """After every round (rejections included) each model's cache is exactly the KV of a fresh
    prefill of the sequence it is meant to hold, and holds all but the last committed token."""
    target, draft = pair
    seen = {"rounds": 0, "rejections": 0}

    def check(seq, tail, tr, dr):
        seen["rounds"] += 1
        assert tr.length == len(seq) - 1
        _assert_cache_is_prefill(tr.cache, target, seq[: tr.length])
        full = seq + tail
        assert dr.length <= len(full) - 1
        _assert_cache_is_prefill(dr.cache, draft, full[: dr.length])

    with torch.no_grad():
        for p in _prompts(3, seed=5):
            fn = sd_generate if method == "sd" else duo_generate
            res = fn(target, draft, p, max_new_tokens=16, gamma=4, on_round=check)
            seen["rejections"] += res.stats.drafted - res.stats.accepted
    assert seen["rounds"] > 5 and seen["rejections"] > 0


def _flaky(model, fail_at: int):
    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.calls = model, model.config, 0

        def forward(self, **kw):
            self.calls += 1
            if self.calls == fail_at:
                raise RuntimeError("draft device lost")
            return self.inner(**kw)

    return Flaky()


@pytest.mark.parametrize("method", ["sd", "duo"])
def test_draft_failure_ends_request_and_target_stays_usable(pair, method):
    target, draft = pair
    p = _prompts(1, seed=7)[0]
    ref = ar_generate(target, p, max_new_tokens=10).tokens
    fn = sd_generate if method == "sd" else duo_generate
    with pytest.raises(DraftError, match="draft device lost"):
        fn(target, _flaky(draft, 3), p, max_new_tokens=10, gamma=4)
    assert ar_generate(target, p, max_new_tokens=10).tokens == ref
    assert fn(target, draft, p, max_new_tokens=10, gamma=4).tokens == ref


def test_mismatched_vocabulary_or_tokenizer_refused(pair):
    target, _ = pair
    with pytest.raises(IncompatibleDraftError, match="vocabulary"):
        check_compatible(target, tiny_llama(1, layers=1, vocab=12))

    class Tok:
        def __init__(self, vocab, eos=2):
            self.vocab, self.eos_token_id, self.bos_token_id = vocab, eos, 1

        def get_vocab(self):
            return self.vocab

    a = {f"t{i}": i for i in range(48)}
    b = {**a, "t47": 46, "x": 47}
    check_compatible(target, target, Tok(a), Tok(dict(a)))
    with pytest.raises(IncompatibleDraftError, match="tokenizer differs"):
        check_compatible(target, target, Tok(a), Tok(b))
    with pytest.raises(IncompatibleDraftError, match="eos_token_id"):
        check_compatible(target, target, Tok(a), Tok(dict(a), eos=3))


def test_profile_gives_positive_times_and_a_budget(pair):
    target, draft = pair
    prof = profile_models(target, draft, repeats=3)
    assert prof.t_draft > 0 and prof.t_verify > 0 and 1 <= prof.gamma <= 64
    assert "gamma* =" in prof.describe()


def test_duo_ttft_beats_sd_on_virtual_clock(pair):
    """Round 1 drafts one token while the target prefills: TTFT = one target forward at ratio 10,
    against gamma draft forwards + one target forward for SD."""
    target, draft = pair
    p = _prompts(1, seed=9)[0]
    duo = duo_generate(target, draft, p, max_new_tokens=8, gamma=8, clock=VirtualClock.ratio(10, 1.0))
    sd = sd_generate(target, draft, p, max_new_tokens=8, gamma=5, clock=VirtualClock.ratio(10, 1.0))
    ar = ar_generate(target, p, max_new_tokens=8, clock=VirtualClock.ratio(10, 1.0))
    assert duo.stats.virtual_ttft_s == 10.0 == ar.stats.virtual_ttft_s
    assert sd.stats.virtual_ttft_s == 15.0
    assert ar.stats.virtual_s == 80.0


def test_clock_set_prices_one_run_like_separate_clocks(pair):
    from leantune.speculative.clock import ClockSet

    target, draft = pair
    p = _prompts(1, seed=11)[0]
    both = ClockSet([VirtualClock.ratio(5, 1.0), VirtualClock.ratio(20, 1.0)])
    duo_generate(target, draft, p, max_new_tokens=10, gamma=4, clock=both, parallel=False)
    for i, r in enumerate((5, 20)):
        one = duo_generate(target, draft, p, max_new_tokens=10, gamma=4, clock=VirtualClock.ratio(r, 1.0))
        assert (both.marks[0][i], both.marks[-1][i]) == (one.stats.virtual_ttft_s, one.stats.virtual_s)


# -- sampling fidelity -------------------------------------------------------------------------

VOCAB = 10
SAMPLING = Sampling(do_sample=True, temperature=0.6, top_p=0.95)


def _exact_first_two(target, prompt: list[int]) -> torch.Tensor:
    """P(t1, t2) = p(t1 | prompt) p(t2 | prompt, t1) under the processed target distribution."""
    with torch.no_grad():
        p1 = processed_probs(target(input_ids=torch.tensor([prompt])).logits[0, -1], SAMPLING)
        rows = torch.tensor([prompt + [t] for t in range(VOCAB)])
        p2 = processed_probs(target(input_ids=rows).logits[:, -1], SAMPLING)
    return p1[:, None] * p2


def _tv_bound(p: torch.Tensor, n: int, delta: float = 1e-3) -> float:
    """A (1 - delta) upper bound on the TV distance of an n-sample empirical law from p:
    E[TV] <= 1/2 sum_x sqrt(p(x)(1-p(x))/n) (Jensen), and TV moves by at most 1/n per sample, so
    McDiarmid adds sqrt(ln(1/delta) / (2n))."""
    return 0.5 * float((p * (1 - p) / n).sqrt().sum()) + math.sqrt(math.log(1 / delta) / (2 * n))


def _fidelity_pair():
    """A vocabulary of 10 keeps the 100 outcomes of (t1, t2) well sampled. Random init gives
    near-uniform laws, so the target's head is scaled by 6 (peaked: top token ~0.4); the draft is
    the target with noise on its head, so that drafts are often but not always accepted (both the
    accept and the residual path run) and its own law is far from the target's (TV 0.26)."""
    target = tiny_llama(0, layers=3, vocab=VOCAB)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)
        noise = torch.randn(target.lm_head.weight.shape, generator=torch.Generator().manual_seed(1))
        draft.lm_head.weight.copy_(target.lm_head.weight + 0.5 * target.lm_head.weight.std() * noise)
    return target, draft


def _fidelity(method: str, runs: int, **kw) -> None:
    target, draft = _fidelity_pair()
    prompt = [3, 7, 1]
    exact = _exact_first_two(target, prompt)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    fn = sd_generate if method == "sd" else duo_generate
    for seed in range(runs):
        g = torch.Generator().manual_seed(seed)
        toks = fn(
            target, draft, prompt, max_new_tokens=2, gamma=3, sampling=SAMPLING, generator=g, **kw
        ).tokens
        counts[toks[0], toks[1]] += 1
    emp = counts / runs
    tv = 0.5 * float((emp - exact).abs().sum())
    bound = _tv_bound(exact.flatten(), runs)
    # the test can tell a wrong sampler apart: the draft's own law is far outside the bound
    q_exact = _exact_first_two(draft, prompt)
    assert 0.5 * float((q_exact - exact).abs().sum()) > bound
    assert tv < bound, (tv, bound)
    tv1 = 0.5 * float((emp.sum(1) - exact.sum(1)).abs().sum())
    assert tv1 < _tv_bound(exact.sum(1), runs), tv1


@pytest.mark.parametrize("method", ["sd", "duo"])
def test_sampling_fidelity_first_two_tokens(method):
    # DuoDecoding serially here (the same tokens as with its draft thread, which costs a thread
    # start per run on a busy machine); the slow test below runs it with the thread.
    _fidelity(method, 600, **({"parallel": False} if method == "duo" else {}))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sd", "duo"])
def test_sampling_fidelity_first_two_tokens_many_runs(method):
    _fidelity(method, 6000)
