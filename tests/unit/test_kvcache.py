"""KV-cache policies (leantune.kvcache): NACL / streaming / random eviction and LongCache.

Oracles are independent of the code under test: transformers' own DynamicCache and explicit
position ids, eager attention weights from ``output_attentions``, plain Python loops, exact
sampling probabilities by enumeration, and a one-layer model fed the compacted token sequence.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leantune.kvcache import KVPolicy
from leantune.kvcache.cache import attach, cache_nbytes, make_cache
from leantune.kvcache.generation import greedy_continue
from leantune.kvcache.longcache import LongCacheConfig, LongCacheHook, prefill
from leantune.kvcache.policy import Budget
from leantune.kvcache.select import proxy_scores, select_indices
from tests.helpers import tiny_llama

N = 40  # prompt length; tiny_llama's max_position_embeddings is 64
SMALL = {"sink": 2, "recent": 4, "proxies": 4}


def _prompt(seed: int = 0, n: int = N) -> torch.Tensor:
    return torch.randint(0, 48, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_llama().eval()


def _run(model, policy: KVPolicy, ids: torch.Tensor, steps: list[int]):
    """Prefill ``ids`` under ``policy``, then feed ``steps``; all logits and the cache."""
    cache = make_cache(policy, model)
    logits = []
    with torch.no_grad(), attach(model, cache):
        out = model(input_ids=ids, cache=cache, use_cache=True)
        logits.append(out.logits)
        for tok in steps:
            out = model(input_ids=torch.tensor([[tok]]), cache=out.cache, use_cache=True)
            logits.append(out.logits)
    return logits, out.cache


# --------------------------------------------------------------------------------------------------
# eviction: end to end


@pytest.mark.parametrize("policy", ["nacl", "streaming", "random"])
@pytest.mark.parametrize("budget", [N, N + 7, 1.0])
def test_budget_covering_the_prompt_is_bitwise_the_full_cache(model, policy, budget):
    ids = _prompt()
    full, _ = _run(model, KVPolicy("full"), ids, [3, 7, 11])
    kept, cache = _run(model, KVPolicy(policy, budget=budget, **SMALL), ids, [3, 7, 11])
    for a, b in zip(full, kept):
        assert torch.equal(a, b)
    assert all(layer.kept is None and layer.keys.shape[-2] == N + 3 for layer in cache.layers)


@pytest.mark.parametrize("policy", ["nacl", "streaming", "random"])
@pytest.mark.parametrize("budget", [12, 20, 0.5])
def test_exactly_the_budget_is_kept_per_kv_head(model, policy, budget):
    tokens = budget if isinstance(budget, int) else math.floor(budget * N)
    _, cache = _run(model, KVPolicy(policy, budget=budget, **SMALL), _prompt(), [5, 6])
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:
        # (batch, KV heads, kept + decoded, head dim): GQA keeps per KV group, not per query head
        assert layer.keys.shape == (1, model.config.num_key_value_heads, tokens + 2, 8)
        assert layer.values.shape == layer.keys.shape
        assert layer.kept.shape == (1, model.config.num_key_value_heads, tokens)
        for row in layer.kept[0].tolist():
            assert row == sorted(set(row)) and len(row) == tokens  # sorted, unique
            assert row[:2] == [0, 1]  # sink
            assert row[-(tokens - 2 if policy == "streaming" else 4) :] == list(
                range(N - (tokens - 2 if policy == "streaming" else 4), N)
            )
    assert cache.get_seq_length() == N + 2  # tokens seen, not kept
    assert (
        cache_nbytes(cache) == 2 * 2 * (tokens + 2) * 2 * 8 * 4
    )  # layers x (k, v) x len x heads x dim x f32


def test_decoding_continues_from_the_prompt_length(model):
    """Oracle: transformers' DynamicCache holding the kept entries of a full prefill, decoded with
    explicit position ids ``N, N + 1, ...``."""
    ids, steps = _prompt(1), [9, 4, 30]
    policy = KVPolicy("nacl", budget=16, **SMALL)
    got, cache = _run(model, policy, ids, steps)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True).cache
        ref, wrong = DynamicCache(), DynamicCache()
        for i, layer in enumerate(cache.layers):
            idx = layer.kept.unsqueeze(-1).expand(*layer.kept.shape, 8)
            k, v = full.layers[i].keys.gather(2, idx), full.layers[i].values.gather(2, idx)
            ref.update(k, v, i)
            wrong.update(k.clone(), v.clone(), i)
        for t, tok in enumerate(steps):
            x = torch.tensor([[tok]])
            want = model(input_ids=x, cache=ref, position_ids=torch.tensor([[N + t]]), use_cache=True).logits
            torch.testing.assert_close(got[t + 1], want, rtol=0, atol=1e-6)
            # positions taken from the cache length (16 + t) would give other logits: the test can fail
            bad = model(
                input_ids=x, cache=wrong, position_ids=torch.tensor([[16 + t]]), use_cache=True
            ).logits
            assert not torch.allclose(got[t + 1], bad, atol=1e-4)


def test_streaming_keeps_sink_and_the_last_tokens(model):
    _, cache = _run(model, KVPolicy("streaming", budget=10, sink=3), _prompt(), [])
    for layer in cache.layers:
        assert (layer.kept == torch.tensor([0, 1, 2, *range(N - 7, N)])).all()


def test_nacl_keeps_the_tokens_the_proxies_attend_to_most():
    """Oracle: the attention weights of eager attention (``output_attentions``) of a full forward."""
    model = tiny_llama(seed=3, attn="eager").eval()
    ids = _prompt(2)
    policy = KVPolicy("nacl", budget=18, sink=2, recent=4, proxies=6, random_fraction=0.0)
    _, cache = _run(model, policy, ids, [])
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, weights in zip(cache.layers, attentions):
        for g in range(model.config.num_key_value_heads):
            heads = weights[0, g * group : (g + 1) * group, -6:, :]  # (group, proxies, N)
            score = [
                sum(float(heads[h, i, j]) for h in range(group) for i in range(6)) / group for j in range(N)
            ]
            middle = sorted(range(2, N - 4), key=lambda j: -score[j])[:12]
            assert layer.kept[0, g].tolist() == sorted([0, 1, *middle, *range(N - 4, N)])


def test_same_seed_same_cache_other_seed_other_cache(model):
    ids = _prompt(4)
    runs = {}
    for seed in (0, 0, 1):
        for name in ("nacl", "random"):
            logits, cache = _run(model, KVPolicy(name, budget=16, seed=seed, **SMALL), ids, [2])
            runs.setdefault((name, seed), []).append((logits[-1], [layer.kept for layer in cache.layers]))
    for name in ("nacl", "random"):
        (l0, k0), (l1, k1) = runs[(name, 0)]
        assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(k0, k1))
        (l2, k2) = runs[(name, 1)][0]
        assert any(not torch.equal(a, b) for a, b in zip(k0, k2))


def test_greedy_continue_under_a_budget_decodes(model):
    new = greedy_continue(model, _prompt(5)[0].tolist(), 6, None, KVPolicy("nacl", budget=0.5, **SMALL))
    full = greedy_continue(model, _prompt(5)[0].tolist(), 6, None, KVPolicy("full"))
    assert len(new) == len(full) == 6


# --------------------------------------------------------------------------------------------------
# selection against plain loops


def _loop_proxy_scores(q, k, scaling):
    b, h, p, _ = q.shape
    g, n = k.shape[1], k.shape[2]
    out = torch.zeros(b, g, n)
    for bi in range(b):
        for hi in range(h):
            for i in range(p):
                pos = n - p + i
                logits = [float(q[bi, hi, i] @ k[bi, hi // (h // g), j]) * scaling for j in range(pos + 1)]
                top = max(logits)
                z = sum(math.exp(x - top) for x in logits)
                for j in range(pos + 1):
                    out[bi, hi // (h // g), j] += math.exp(logits[j] - top) / z / (h // g)
    return out


def test_proxy_scores_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 3, 4, generator=g), torch.randn(2, 2, 9, 4, generator=g)
    torch.testing.assert_close(proxy_scores(q, k, 0.5), _loop_proxy_scores(q, k, 0.5), rtol=1e-5, atol=1e-6)


def test_nacl_selection_matches_a_plain_loop():
    """Deterministic part exactly; the sampled part drawn only from what is left of the middle."""
    n, budget = 30, Budget(sink=3, recent=5, scored=6, sampled=4)
    scores = torch.rand(2, 3, n, generator=torch.Generator().manual_seed(1))
    idx = select_indices(budget, n, scores=scores, generator=torch.Generator().manual_seed(2))
    assert idx.shape == (2, 3, 18)
    for b in range(2):
        for h in range(3):
            row = idx[b, h].tolist()
            assert row == sorted(set(row))
            middle = list(range(3, n - 5))
            ranked = sorted(middle, key=lambda j: -float(scores[b, h, j]))
            top = ranked[:6]
            sampled = set(row) - set(range(3)) - set(range(n - 5, n)) - set(top)
            assert set(range(3)) | set(range(n - 5, n)) | set(top) <= set(row)
            assert len(sampled) == 4 and sampled <= set(ranked[6:])


def _exact_set_probabilities(weights: list[float], k: int) -> dict[frozenset, float]:
    """P(set) of drawing k without replacement with probability proportional to ``weights``."""
    probs: dict[frozenset, float] = {}
    for order in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, sum(weights)
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        probs[frozenset(order)] = probs.get(frozenset(order), 0.0) + p
    return probs


def test_random_part_is_drawn_with_softmax_probabilities_without_replacement():
    """Oracle: exact probabilities of each 2-subset of 4 candidates with weights softmax(score)."""
    score = torch.tensor([0.0, 2.0, 0.5, 1.0])
    n, draws = 4, 20000
    idx = select_indices(
        Budget(0, 0, 0, 2),
        n,
        scores=score.expand(draws, 1, n),
        generator=torch.Generator().manual_seed(0),
    )
    exact = _exact_set_probabilities(score.softmax(0).tolist(), 2)
    counts: dict[frozenset, int] = {}
    for row in idx[:, 0].tolist():
        counts[frozenset(row)] = counts.get(frozenset(row), 0) + 1
    for subset, p in exact.items():
        sd = math.sqrt(p * (1 - p) / draws)
        assert abs(counts.get(subset, 0) / draws - p) < 4.5 * sd, (subset, p)


def test_uniform_random_policy_draws_uniformly():
    draws = 12000
    idx = select_indices(Budget(1, 1, 0, 1), 6, shape=(draws, 1), generator=torch.Generator().manual_seed(3))
    middle = idx[:, 0, 1]  # sorted row: sink 0, one of 1..4, recent 5
    freq = torch.bincount(middle, minlength=6)[1:5].float() / draws
    assert (freq - 0.25).abs().max() < 4.5 * math.sqrt(0.25 * 0.75 / draws)


# --------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy": "nacl", "budget": 0}, r"--kv-budget must be at least 1 token"),
        ({"policy": "nacl", "budget": "0"}, r"--kv-budget must be at least 1 token"),
        ({"policy": "random", "budget": -3}, r"--kv-budget must be at least 1 token"),
        ({"policy": "nacl", "budget": -0.2}, r"--kv-budget as a fraction .* \(0, 1\]"),
        ({"policy": "nacl", "budget": 1.5}, r"--kv-budget as a fraction"),
        ({"policy": "nacl", "budget": "lots"}, r"--kv-budget must be a token count"),
        ({"policy": "nacl", "budget": 19}, r"--kv-budget 19 tokens is below --kv-sink \+ --kv-recent = 20"),
        ({"policy": "streaming", "budget": 3}, r"--kv-budget 3 tokens is below --kv-sink = 4"),
        ({"policy": "nacl"}, r"--kv-policy nacl needs --kv-budget"),
        ({"policy": "full", "budget": 10}, r"--kv-budget applies to nacl, streaming, random"),
        ({"policy": "lru", "budget": 10}, r"--kv-policy must be one of"),
        ({"policy": "nacl", "budget": 30, "sink": -1}, r"--kv-sink must be an int >= 0"),
        ({"policy": "nacl", "budget": 30, "random_fraction": 2}, r"--kv-random-fraction must be"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVPolicy(**kwargs)


def test_a_fractional_budget_below_sink_plus_recent_fails_for_that_prompt(model):
    policy = KVPolicy("nacl", budget=0.1)  # fine as an option: 10% of what?
    assert policy.resolve(400) == Budget(4, 16, 13, 7)
    with pytest.raises(
        ValueError, match=re.escape("--kv-budget 10 tokens (0.1 of a 100-token prompt) is below")
    ):
        policy.resolve(100)
    with pytest.raises(ValueError, match="is below --kv-sink"):
        greedy_continue(model, list(range(40)), 2, None, policy)


def test_cli_rejects_bad_budgets_before_loading(tmp_path, capsys):
    from leantune.cli import main

    missing = str(tmp_path / "no-model")
    with pytest.raises(SystemExit) as err:
        main(["generate", missing, "hi", "--kv-policy", "nacl", "--kv-budget", "0"])
    assert err.value.code == 2 and "--kv-budget" in capsys.readouterr().err
    assert main(["generate", missing, "hi", "--kv-policy", "nacl", "--kv-budget", "8"]) == 2
    assert "below --kv-sink + --kv-recent" in capsys.readouterr().err
    assert main(["eval", missing, "--task", "passkey", "--kv-policy", "longcache", "--kv-chunk", "500"]) == 2
    assert "--kv-chunk 500 exceeds --kv-local" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# LongCache

LC = LongCacheConfig(global_size=4, local_size=24, span=4, topk=2, clip=8, chunk=8)  # 4 + 32 + 24 = 60 < 64


def _longcache_logits(model, ids, steps, config=LC):
    hook = LongCacheHook(model, config)
    cache = DynamicCache()
    with torch.no_grad(), attach(model, None, hook):
        out = prefill(model, ids, cache, config)
        logits = [out.logits[:, -1]]
        for tok in steps:
            out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return logits, hook, cache


def test_longcache_is_full_attention_while_the_context_fits(model):
    ids = _prompt(6, n=25)  # 25 + 3 decoded = 28 = global + local
    got, hook, _ = _longcache_logits(model, ids, [1, 2, 3])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # as prefill() does
        want = [out.logits[:, -1]]
        for tok in [1, 2, 3]:
            out = model(input_ids=torch.tensor([[tok]]), cache=out.cache, use_cache=True)
            want.append(out.logits[:, -1])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert all(v["selected"] is None for v in hook.last.values())


def test_longcache_positions_stay_below_the_training_length(model):
    got, hook, cache = _longcache_logits(model, _prompt(7, n=300), [5, 6, 7, 8])
    assert cache.get_seq_length() == 304  # every token is cached
    assert hook.max_position < 64 and hook.max_position > 28  # the middle was used
    for v in hook.last.values():
        sel = v["selected"].tolist()
        assert sel == sorted(set(sel)) and all(4 <= i < 304 - 24 for i in sel)
        assert len(sel) <= LC.clip * LC.span
    assert all(torch.isfinite(x).all() for x in got)


def test_longcache_decoding_equals_a_model_fed_the_compacted_tokens():
    """Oracle: in a one-layer model a token's key and value depend only on the token and its
    position, so attending [global; selected; local] at positions 0..L-1 is a plain forward of those
    tokens."""
    model = tiny_llama(seed=5, layers=1).eval()
    ids = _prompt(8, n=150)
    got, hook, _ = _longcache_logits(model, ids, [17])
    seq = ids[0].tolist() + [17]
    n = len(seq)
    sel = hook.last[0]["selected"].tolist()
    assert sel  # the middle took part
    kept = [*range(4), *sel, *range(n - 24, n)]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([[seq[i] for i in kept]])).logits[:, -1]
    torch.testing.assert_close(got[-1], want, rtol=1e-5, atol=1e-5)


def _loop_select(q0, k0, lo, cfg):
    """LongCache's selection on position-free q ``(H, q, D)`` and middle k ``(G, m, D)``, in loops."""
    h, g, m = q0.shape[0], k0.shape[0], k0.shape[1]
    counts = [0] * m
    for head in range(h):
        for i in range(q0.shape[1]):
            s = [float(q0[head, i] @ k0[head // (h // g), j]) for j in range(m)]
            for j in sorted(range(m), key=lambda j: -s[j])[: cfg.topk]:
                counts[j] += 1
    chosen = [j for j in range(m) if counts[j]]
    chosen = sorted(chosen, key=lambda j: (-counts[j], j))[: cfg.clip]
    keep = set()
    for j in chosen:
        keep |= {t for t in range(j - cfg.span // 2, j - cfg.span // 2 + cfg.span) if 0 <= t < m}
    return [t + lo for t in sorted(keep)]


def test_longcache_selection_matches_a_plain_loop(model):
    cfg = LongCacheConfig(global_size=3, local_size=10, span=3, topk=2, clip=4, chunk=4)
    hook = LongCacheHook(model, cfg)
    gen = torch.Generator().manual_seed(9)
    n, q_len = 50, 4
    q0, k0 = torch.randn(1, 4, q_len, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)
    # the rotated inputs the hook sees, made by transformers' rotary embedding
    cos, sin = model.model.rotary_emb(k0, torch.arange(n)[None])
    q, _ = apply_rotary_pos_emb(q0, q0, cos[:, n - q_len :], sin[:, n - q_len :])
    _, k = apply_rotary_pos_emb(k0, k0, cos, sin)
    got = hook.select(q, k).tolist()
    assert got == _loop_select(q0[0], k0[0, :, 3 : n - 10], 3, cfg)
    assert got == sorted(set(got))


def test_longcache_windows_must_fit_the_training_length(model):
    with pytest.raises(ValueError, match=r"--kv-global \+ --kv-clip \* --kv-span \+ --kv-local = .* exceeds"):
        LongCacheHook(model, LongCacheConfig())  # 252 > 64
    with pytest.raises(ValueError, match="exceeds the training length 40"):
        KVPolicy("longcache", longcache=LC, train_length=40)
