"""HFT: the draw (counts, determinism, stages, odd groups, experts), the mask on plain and fused
layouts, its file, and the fused optimizers: frozen tensors and frozen parts of fused tensors are
never written, and a fused layout trains exactly like the same model with separate matrices."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from leantune import hft
from leantune.anatomy import model_anatomy
from leantune.optim import LOMO, AdaLomo, InBackward
from tests.families import tiny_model
from tests.helpers import batch, loss_of, tiny_llama

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_blocks(n: int) -> list[hft.BlockUnits]:
    return [hft.BlockUnits(f"model.layers.{i}", ATTN, (FFN,)) for i in range(n)]


def test_llama_blocks_come_from_the_anatomy():
    units = hft.block_units(model_anatomy(tiny_llama()))
    assert units == llama_blocks(2)


@pytest.mark.parametrize("n_blocks", [1, 2, 5, 8])
def test_draw_freezes_2_of_4_attention_and_half_the_blocks_2_of_3_ffn(n_blocks):
    blocks = llama_blocks(n_blocks)
    two_counts = set()
    for seed in range(40):
        mask = hft.draw_mask(blocks, seed=seed, stage=0)
        assert list(mask.frozen) == [b.name for b in blocks]
        two = 0
        for units in mask.frozen.values():
            attn = [u for u in units if u in ATTN]
            ffn = [u for u in units if u in FFN]
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
        for units in hft.draw_mask(llama_blocks(8), seed=seed, stage=0).frozen.values():
            freq.update(units)
    n = draws * 8
    for unit in ATTN + FFN:  # 2 of 4 attention, 1.5 of 3 feed-forward on average: half of each
        assert 0.45 < freq[unit] / n < 0.55, (unit, freq[unit] / n)


def test_draw_is_deterministic_and_differs_by_seed_stage_and_redraw():
    blocks = llama_blocks(8)
    a = hft.draw_mask(blocks, seed=7, stage=2, redraw=1)
    assert a == hft.draw_mask(blocks, seed=7, stage=2, redraw=1)
    assert a.frozen != hft.draw_mask(blocks, seed=8, stage=2, redraw=1).frozen
    assert a.frozen != hft.draw_mask(blocks, seed=7, stage=3, redraw=1).frozen
    assert a.frozen != hft.draw_mask(blocks, seed=7, stage=2, redraw=0).frozen
    # pinned (the same choices as before units were named by their module path): a change of the
    # draw would silently change every saved run's next stage
    two = [hft.BlockUnits("l.0", ATTN, (FFN,)), hft.BlockUnits("l.1", ATTN, (FFN,))]
    assert hft.draw_mask(two, seed=0, stage=0).frozen == {
        "l.0": ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"),
        "l.1": ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"),
    }


def test_draw_generalises_to_odd_attention_two_matrix_mlps_and_experts():
    # DeepSeek-like: 5 attention matrices; a shared expert and 4 experts of 3; GPT-2-like: 2 + 2.
    experts = tuple((f"e[{i}].gate", f"e[{i}].up", f"e[{i}].down") for i in range(4))
    moe = [
        hft.BlockUnits(f"b.{i}", ("a", "b", "c", "d", "e"), (("sg", "su", "sd"), *experts)) for i in range(6)
    ]
    gpt2 = [
        hft.BlockUnits(f"g.{i}", ("qkv[q]", "qkv[k]", "qkv[v]", "proj"), (("fc", "proj2"),)) for i in range(3)
    ]
    for seed in range(20):
        mask = hft.draw_mask(moe, seed=seed, stage=0)
        attn_counts = sorted(sum(u in "abcde" for u in units) for units in mask.frozen.values())
        assert attn_counts == [2, 2, 2, 3, 3, 3]  # half the blocks freeze the larger half
        for units in mask.frozen.values():
            per_group = [sum(u in g for u in units) for g in (("sg", "su", "sd"), *experts)]
            assert len(set(per_group)) == 1 and per_group[0] in (1, 2)  # one rule per block
        for units in hft.draw_mask(gpt2, seed=seed, stage=0).frozen.values():
            assert sum(u.startswith("qkv") or u == "proj" for u in units) == 2
            assert sum(u in ("fc", "proj2") for u in units) == 1


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_apply_mask_freezes_exactly_the_chosen_tensors_and_counts_parameters(tie):
    model = tiny_llama(tie=tie)
    anatomy = model_anatomy(model)
    mask = hft.draw_mask(hft.block_units(anatomy), seed=3, stage=0)
    report = hft.apply_mask(model, mask, anatomy)
    expected_frozen = {f"{b}.{u}.weight" for b in mask.frozen for u in mask.frozen[b]}
    if not tie:
        expected_frozen.add("model.embed_tokens.weight")  # the policy: input embeddings frozen
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == expected_frozen == set(report.frozen_names)
    assert report.segments == {} and report.frozen_parts == ()
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
    blocks = hft.block_units(model_anatomy(model))
    hft.apply_mask(model, hft.draw_mask(blocks, seed=0, stage=0))
    second = hft.draw_mask(blocks, seed=0, stage=1)
    report = hft.apply_mask(model, second)
    fresh = tiny_llama()
    assert report == hft.apply_mask(fresh, second)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in fresh.parameters()]
    with pytest.raises(hft.HftError, match="does not fit this model"):
        hft.apply_mask(model, hft.draw_mask([hft.BlockUnits("other.0", ATTN, (FFN,))], seed=0, stage=0))
    bad = hft.HftMask(0, 0, 0, {b.name: ("self_attn.nope",) for b in blocks})
    with pytest.raises(hft.HftError, match="no such matrix"):
        hft.apply_mask(model, bad)


def test_version_1_state_files_still_apply(tmp_path):
    """Files of earlier leantune versions name LLaMA projections by their last component."""
    model = tiny_llama()
    v1 = {
        "version": 1,
        "policy": {},
        "history": [
            {
                "seed": 0,
                "stage": 0,
                "redraw": 0,
                "frozen": {
                    "model.layers.0": ["q_proj", "o_proj", "gate_proj"],
                    "model.layers.1": ["v_proj", "o_proj", "gate_proj", "up_proj"],
                },
            }
        ],
    }
    (tmp_path / hft.STATE_FILE).write_text(json.dumps(v1))
    tracker = hft.HftTracker(model, seed=9)
    tracker.restore(hft.load_state(tmp_path))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.weight" in frozen
    assert (
        "model.layers.1.mlp.up_proj.weight" in frozen and "model.layers.1.mlp.down_proj.weight" not in frozen
    )


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
    (tmp_path / hft.STATE_FILE).write_text(json.dumps({"version": 99, "history": []}))
    with pytest.raises(hft.HftError, match="version 99"):
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


# ---------------------------------------------------------------------------- fused layouts
LLAMA_KW = dict(
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rms_norm_eps=1e-6,
)
# the same matrix under its two names
PHI3_UNIT = {
    "self_attn.q_proj": "self_attn.qkv_proj[q]",
    "self_attn.k_proj": "self_attn.qkv_proj[k]",
    "self_attn.v_proj": "self_attn.qkv_proj[v]",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_up_proj[gate]",
    "mlp.up_proj": "mlp.gate_up_proj[up]",
    "mlp.down_proj": "mlp.down_proj",
}


def llama_and_phi3(seed: int = 0):
    """A LLaMA and a Phi-3 that compute the same function: Phi-3's qkv_proj is LLaMA's q, k, v
    stacked by rows, its gate_up_proj gate and up (checked on the logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA_KW))
    phi3 = Phi3ForCausalLM(Phi3Config(**LLAMA_KW, resid_pdrop=0.0, embd_pdrop=0.0))
    phi3.load_state_dict(fuse(llama.state_dict()))
    for m in (llama, phi3):
        m.config.use_cache = False
    ids = batch(seed)["input_ids"]
    assert torch.equal(llama(input_ids=ids).logits, phi3(input_ids=ids).logits)
    return llama, phi3


def fuse(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for parts, fused in (
            (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
            (("gate_proj", "up_proj"), "gate_up_proj"),
        ):
            if parts[0] in k:
                out[k.replace(parts[0], fused)] = torch.cat([sd[k.replace(parts[0], p)] for p in parts])
        if not any(p in k for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            out[k] = v
    return out


def test_phi3_units_are_llama_matrices_and_fused_tensors_train_in_segments():
    llama, phi3 = llama_and_phi3()
    anatomy = model_anatomy(phi3)
    assert set(anatomy.fused) == {"self_attn.qkv_proj", "mlp.gate_up_proj"}
    mask = hft.draw_mask(hft.block_units(model_anatomy(llama)), seed=4, stage=0)
    phi3_mask = hft.HftMask(
        4, 0, 0, {b: tuple(PHI3_UNIT[u] for u in units) for b, units in mask.frozen.items()}
    )
    ours = hft.apply_mask(phi3, phi3_mask, anatomy)
    theirs = hft.apply_mask(llama, mask)
    # the same number of trainable parameters, counted by parts
    assert (ours.trainable, ours.total) == (theirs.trainable, theirs.total)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert {s.name for s in ours.segments[qkv]} == {
        PHI3_UNIT[u] for u in ATTN[:3] if u not in mask.frozen["model.layers.0"]
    }


@pytest.mark.parametrize(
    ("make", "atol"),
    [
        (lambda m: AdaLomo(m, lr=0.05), 1e-7),
        (lambda m: AdaLomo(m, lr=0.05, clip_grad_norm=0.5, accumulation_steps=2), 1e-7),
        (lambda m: LOMO(m, lr=0.05, clip_grad_norm=1.0), 1e-7),
        # AdamW's m / (sqrt(v) + eps) turns the last-bit differences of a fused vs a split matmul
        # gradient into ~1e-4 lr where |g| ~ eps; a wrong statistic would be off by ~lr = 1e-2.
        (lambda m: InBackward(torch.optim.AdamW, m, lr=1e-2, weight_decay=0.1), 1e-5),
    ],
    ids=["adalomo", "adalomo-clip-accum", "lomo-clip", "adamw-in-backward"],
)
def test_hft_on_fused_tensors_trains_exactly_like_separate_matrices(make, atol):
    """Oracle: the same mask on a LLaMA, whose matrices are separate tensors. Every statistic of a
    fused part (AdaLomo's factors and RMS, the clipping norm, AdamW's moments) must be its own."""
    llama, phi3 = llama_and_phi3()
    mask = hft.draw_mask(hft.block_units(model_anatomy(llama)), seed=4, stage=0)
    hft.apply_mask(llama, mask)
    report = hft.apply_mask(
        phi3, hft.HftMask(4, 0, 0, {b: tuple(PHI3_UNIT[u] for u in us) for b, us in mask.frozen.items()})
    )
    before = {n: p.detach().clone() for n, p in phi3.named_parameters()}
    opt_l, opt_p = make(llama), make(phi3)
    opt_p.set_segments(report.segments)
    for step in range(6):
        b = batch(step)
        opt_l.backward(loss_of(llama, b))
        opt_p.backward(loss_of(phi3, b))
    want = fuse(llama.state_dict())
    for name, p in phi3.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-5, atol=atol, msg=name)
    # frozen parts bitwise unchanged, trainable parts changed
    for unit in report.frozen_parts:
        name, part = unit.split("[", 1)
        seg = next(s for s in _all_parts(phi3, name) if s[0] == part[:-1])
        assert torch.equal(_part(phi3.get_parameter(name), seg[1]), _part(before[name], seg[1])), unit
    for name, segs in report.segments.items():
        for s in segs:
            assert not torch.equal(_part(phi3.get_parameter(name), s.rows), _part(before[name], s.rows)), (
                name,
                s.name,
            )
    # no optimizer state for the frozen parts
    qkv = phi3.get_parameter("model.layers.0.self_attn.qkv_proj.weight")
    names = {k.split("|")[0] for k in opt_p.state[qkv]}
    trainable = {s.name for s in report.segments["model.layers.0.self_attn.qkv_proj.weight"]}
    assert names == (set() if isinstance(opt_p, LOMO) else trainable)  # LOMO keeps no state at all


def _all_parts(model, name):
    anatomy = model_anatomy(model, probe=True)
    for block in anatomy.blocks:
        for unit in block.units():
            for piece in unit.pieces:
                if piece.param == name:
                    yield unit.name, piece.rows


def _part(t, rows):
    return t.detach()[torch.cat([torch.arange(r.start, r.stop, r.step) for r in rows])]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_hft_freezes_parts_of_fused_tensors_in_every_layout(family):
    """Columns (GPT-2), per-head interleaved rows (GPT-NeoX), grouped rows (Falcon), experts: the
    frozen parts are bitwise unchanged, the trainable ones change, the counted fraction is right."""
    model = tiny_model(family, vocab_size=64)
    tracker = hft.HftTracker(model, seed=0)
    report = tracker.report
    assert report.segments, "a fused layout gives segments"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdaLomo(model, lr=0.05)
    opt.set_segments(report.segments)
    for step in range(3):
        opt.backward(loss_of(model, batch(step, vocab=64)))
    by_param: dict[str, list] = {}
    for block in tracker.anatomy.blocks:
        for unit in block.units():
            for piece in unit.pieces:
                by_param.setdefault(piece.param, []).append((unit.name, piece))
    frozen_parts = set(report.frozen_parts)
    trained = 0
    for name, p in model.named_parameters():
        if name in report.segments:
            view = p.detach().view(-1, p.shape[-1]) if p.dim() > 1 else p.detach().view(-1, 1)
            old = before[name].view_as(view)
            for unit, piece in by_param[name]:
                rows = (
                    torch.cat([torch.arange(r.start, r.stop, r.step) for r in piece.rows])
                    if piece.rows
                    else slice(None)
                )
                cols = (
                    torch.cat([torch.arange(r.start, r.stop, r.step) for r in piece.cols])
                    if piece.cols
                    else slice(None)
                )
                same = torch.equal(view[rows][:, cols], old[rows][:, cols])
                assert same == (f"{name}[{unit}]" in frozen_parts), (name, unit)
                trained += 0 if same else view[rows][:, cols].numel()
        elif not p.requires_grad:
            assert torch.equal(p, before[name]), name
    assert report.trainable == sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in report.segments
    ) + sum(
        s.shape(model.get_parameter(n).shape).numel() for n, segs in report.segments.items() for s in segs
    )
    assert 0.3 < report.fraction < 0.7 and trained > 0


def test_a_fused_gate_up_in_an_unknown_layout_is_refused(monkeypatch):
    """Gate row i paired with up row I-1-i: neither [gate; up] nor interleaved. HFT cannot choose
    half of the matrices then, and says so (instead of freezing the tensor as one unit)."""
    from transformers.models.phi3 import modeling_phi3

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up.flip(-1) * self.activation_fn(gate))

    monkeypatch.setattr(modeling_phi3.Phi3MLP, "forward", forward)
    model = tiny_model("phi3", vocab_size=64)
    assert model_anatomy(model).fused["mlp.gate_up_proj"] == "gate/up layout not recognised: one unit"
    message = r"train\.hft on phi3: mlp\.gate_up_proj holds gate and up .* peft"
    with pytest.raises(hft.HftError, match=message):
        hft.HftTracker(model, seed=0)
