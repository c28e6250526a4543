"""HFT: block discovery, the draw (counts, determinism, stages), the mask, its file, and the
fused optimizers skipping frozen tensors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from leantune import hft
from leantune.optim import AdaLomo, InBackward
from tests.helpers import batch, loss_of, tiny_llama

NAMES8 = [f"model.layers.{i}" for i in range(8)]


def test_find_blocks_on_llama():
    blocks = hft.find_blocks(tiny_llama())
    assert [b.name for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert blocks[1].modules["k_proj"] == "model.layers.1.self_attn.k_proj"
    assert blocks[0].modules["down_proj"] == "model.layers.0.mlp.down_proj"


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=48, n_positions=32))


def _llama_without_gate():
    model = tiny_llama()
    del model.model.layers[1].mlp.gate_proj
    return model


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_gpt2, r"this model has none\. Linear layers found: .*lm_head"),
        (_llama_without_gate, r"block model\.layers\.1 has no gate_proj"),
    ],
    ids=["gpt2-fused-qkv", "missing-gate"],
)
def test_find_blocks_names_what_it_found(make, message):
    with pytest.raises(hft.HftError, match=message):
        hft.find_blocks(make())


@pytest.mark.parametrize("n_blocks", [1, 2, 5, 8])
def test_draw_freezes_2_of_4_attention_and_half_the_blocks_2_of_3_ffn(n_blocks):
    names = [f"b.{i}" for i in range(n_blocks)]
    two_counts = set()
    for seed in range(40):
        mask = hft.draw_mask(names, seed=seed, stage=0)
        assert list(mask.frozen) == names
        two = 0
        for roles in mask.frozen.values():
            attn = [r for r in roles if r in hft.ATTENTION]
            ffn = [r for r in roles if r in hft.FEED_FORWARD]
            assert len(attn) == 2 and len(set(attn)) == 2
            assert len(ffn) in (1, 2) and len(set(ffn)) == len(ffn)
            two += len(ffn) == 2
        assert two in (n_blocks // 2, (n_blocks + 1) // 2)
        two_counts.add(two)
    if n_blocks % 2:  # the odd block goes either way
        assert two_counts == {n_blocks // 2, n_blocks // 2 + 1}


def test_draw_is_uniform_over_projections():
    freq = Counter()
    draws = 300
    for seed in range(draws):
        for roles in hft.draw_mask(NAMES8, seed=seed, stage=0).frozen.values():
            freq.update(roles)
    n = draws * len(NAMES8)
    for role in hft.ATTENTION:
        assert 0.45 < freq[role] / n < 0.55, (role, freq[role] / n)
    for role in hft.FEED_FORWARD:  # 1.5 of 3 frozen on average
        assert 0.45 < freq[role] / n < 0.55, (role, freq[role] / n)


def test_draw_is_deterministic_and_differs_by_seed_stage_and_redraw():
    a = hft.draw_mask(NAMES8, seed=7, stage=2, redraw=1)
    assert a == hft.draw_mask(NAMES8, seed=7, stage=2, redraw=1)
    assert a.frozen != hft.draw_mask(NAMES8, seed=8, stage=2, redraw=1).frozen
    assert a.frozen != hft.draw_mask(NAMES8, seed=7, stage=3, redraw=1).frozen
    assert a.frozen != hft.draw_mask(NAMES8, seed=7, stage=2, redraw=0).frozen
    # pinned: a change of the draw would silently change every saved run's next stage
    assert hft.draw_mask(["l.0", "l.1"], seed=0, stage=0).frozen == {
        "l.0": ("q_proj", "o_proj", "gate_proj"),
        "l.1": ("v_proj", "o_proj", "gate_proj", "up_proj"),
    }


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_apply_mask_freezes_exactly_the_chosen_tensors_and_counts_parameters(tie):
    model = tiny_llama(tie=tie)
    blocks = hft.find_blocks(model)
    mask = hft.draw_mask([b.name for b in blocks], seed=3, stage=0)
    report = hft.apply_mask(model, mask, blocks)
    expected_frozen = {
        f"{b}.{'self_attn' if r in hft.ATTENTION else 'mlp'}.{r}.weight"
        for b in mask.frozen
        for r in mask.frozen[b]
    }
    if not tie:
        expected_frozen.add("model.embed_tokens.weight")  # the policy: input embeddings frozen
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == expected_frozen == set(report.frozen_names)
    # parameters, not matrices: with GQA (4 heads, 2 kv heads) k/v are half the size of q/o
    shapes = {n: p.numel() for n, p in model.named_parameters()}
    assert (
        shapes["model.layers.0.self_attn.k_proj.weight"] * 2
        == shapes["model.layers.0.self_attn.q_proj.weight"]
    )
    total = sum(shapes.values())
    assert report.total == total
    assert report.trainable == total - sum(shapes[n] for n in expected_frozen)
    assert report.fraction == pytest.approx(report.trainable / total, abs=0)
    assert model.lm_head.weight.requires_grad and model.model.norm.weight.requires_grad


def test_apply_mask_replaces_the_previous_mask_and_rejects_a_foreign_one():
    model = tiny_llama()
    names = [b.name for b in hft.find_blocks(model)]
    hft.apply_mask(model, hft.draw_mask(names, seed=0, stage=0))
    second = hft.draw_mask(names, seed=0, stage=1)
    report = hft.apply_mask(model, second)
    fresh = tiny_llama()
    assert report == hft.apply_mask(fresh, second)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in fresh.parameters()]
    with pytest.raises(hft.HftError, match="does not fit this model"):
        hft.apply_mask(model, hft.draw_mask(["other.0"], seed=0, stage=0))


def test_state_round_trips_and_counts_stages(tmp_path):
    model = tiny_llama()
    tracker = hft.HftTracker(model, seed=5)
    assert tracker.mask.stage == 0 and tracker.state.next_stage == 1
    tracker.redraw(1, step=10)
    path = tracker.state.save(tmp_path)
    data = json.loads(path.read_text())
    assert data["policy"]["embeddings"] == "frozen" and len(data["history"]) == 2
    assert data["history"][1]["step"] == 10 and data["history"][1]["redraw"] == 1
    loaded = hft.load_state(tmp_path)
    assert loaded.current == tracker.mask
    # a new stage from this model: stage 1, history kept, a different mask
    nxt = hft.HftTracker(tiny_llama(), seed=5, previous=loaded)
    assert nxt.mask.stage == 1 and len(nxt.state.history) == 3
    assert nxt.mask.frozen != tracker.mask.frozen
    # restore applies the saved mask exactly
    other = hft.HftTracker(tiny_llama(), seed=99)
    other.restore(loaded)
    assert other.mask == tracker.mask
    assert [p.requires_grad for p in other.model.parameters()] == [
        p.requires_grad for p in model.parameters()
    ]
    assert hft.load_state(tmp_path / "nothing-here") is None
    (tmp_path / hft.STATE_FILE).write_text("{")
    with pytest.raises(hft.HftError, match="unreadable"):
        hft.load_state(tmp_path)


def test_adalomo_updates_only_unfrozen_tensors_and_follows_a_redraw():
    model = tiny_llama()
    tracker = hft.HftTracker(model, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdaLomo(model, lr=0.05)
    assert {id(p) for p in opt.trainable_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    b = batch()
    first = loss_of(model, b).item()
    for _ in range(5):
        opt.backward(loss_of(model, b))
    assert loss_of(model, b).item() < first
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (not p.requires_grad), n  # frozen: bitwise unchanged
    assert opt.state and all(p.requires_grad for p in opt.state)  # no state for frozen tensors
    # a redraw: hooks follow the new mask, newly frozen tensors lose their state
    tracker.redraw(1, step=5)
    opt.refresh_hooks()
    assert {id(p) for p in opt.trainable_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert all(p.requires_grad for p in opt.state)
    frozen_now = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt.backward(loss_of(model, b))
    assert all(torch.equal(p, frozen_now[n]) for n, p in model.named_parameters() if n in frozen_now)


def test_hft_adalomo_keeps_less_state_and_computes_fewer_gradients_than_full():
    b = batch()
    counts = {}
    for name in ("full", "hft"):
        model = tiny_llama()
        if name == "hft":
            hft.HftTracker(model, seed=2)
        seen = []
        for p in (p for p in model.parameters() if p.requires_grad):
            p.register_post_accumulate_grad_hook(lambda p, seen=seen: seen.append(p.numel()))
        opt = AdaLomo(model, lr=0.05)
        opt.backward(loss_of(model, b))
        state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        counts[name] = (sum(seen), state)
    assert counts["hft"][0] < 0.6 * counts["full"][0]  # gradient elements computed
    assert counts["hft"][1] < counts["full"][1]  # optimizer state elements


def test_in_backward_starts_fresh_after_a_tensor_is_frozen_and_unfrozen():
    model = tiny_llama()
    opt = InBackward(torch.optim.AdamW, model, lr=1e-2)
    b = batch()
    opt.backward(loss_of(model, b))
    p = model.model.layers[0].self_attn.q_proj.weight
    p.requires_grad_(False)
    opt.refresh_hooks()
    assert p not in opt.state
    p.requires_grad_(True)
    opt.refresh_hooks()
    opt.backward(loss_of(model, b))
    # the state after one update since unfreezing, and saved with the optimizer
    assert int(opt.state[p]["step"]) == 1
