"""The anatomy of every supported family: blocks, attention and feed-forward units, experts, routers,
and the parts of fused tensors, checked against each family's layout as its modelling code
defines it (the formulas below), not against the probe that finds them."""

from __future__ import annotations

import pytest
import torch

from leantune.anatomy import AnatomyError, find_blocks, model_anatomy
from leantune.optim.segments import index_tensor
from tests.families import FAMILIES, tiny_config, tiny_model

H, HEADS, KV, D = 64, 4, 2, 16  # tests/families.py: hidden 64, 4 heads, 2 kv heads (head dim 16)


def _units(family: str, block: int = 0):
    anatomy = model_anatomy(tiny_model(family, vocab_size=64))
    return anatomy, anatomy.blocks[block]


def _rows(unit, param_suffix: str = "weight") -> list[int]:
    piece = next(p for p in unit.pieces if p.param.endswith(param_suffix))
    return index_tensor(piece.rows).tolist() if piece.rows is not None else None


def _cols(unit) -> list[int]:
    piece = next(p for p in unit.pieces if p.param.endswith("weight"))
    return index_tensor(piece.cols).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_has_blocks_attention_and_feed_forward(family):
    model = tiny_model(family, vocab_size=64)
    anatomy = model_anatomy(model)
    assert len(anatomy.blocks) == 2 and anatomy.family == tiny_config(family).model_type
    params = dict(model.named_parameters())
    for block in anatomy.blocks:
        assert len(block.attention) >= 4 and block.ffn and all(block.ffn)
        for unit in block.units():
            assert unit.numel > 0 and all(p.param in params for p in unit.pieces)
    # units never overlap and cover each matrix they name exactly once
    covered: dict[str, int] = {}
    for block in anatomy.blocks:
        for unit in block.units():
            for piece in unit.pieces:
                covered[piece.param] = covered.get(piece.param, 0)
    for block in anatomy.blocks:
        for unit in block.units():
            for piece in unit.pieces:
                p = params[piece.param]
                cols = p.shape[-1] if p.dim() > 1 else 1
                rows = p.numel() // cols
                n = (len(index_tensor(piece.rows)) if piece.rows else rows) * (
                    len(index_tensor(piece.cols)) if piece.cols else cols
                )
                covered[piece.param] += n
    for name, n in covered.items():
        assert n == params[name].numel(), name
    assert anatomy.embedding is not None and anatomy.head is not None


def test_phi3_qkv_is_stacked_by_rows_and_gate_up_by_halves():
    anatomy, block = _units("phi3")
    units = {u.name: u for u in block.units()}
    q, k = HEADS * D, KV * D
    assert _rows(units["self_attn.qkv_proj[q]"]) == list(range(0, q))
    assert _rows(units["self_attn.qkv_proj[k]"]) == list(range(q, q + k))
    assert _rows(units["self_attn.qkv_proj[v]"]) == list(range(q + k, q + 2 * k))
    assert _rows(units["mlp.gate_up_proj[gate]"]) == list(range(128))
    assert _rows(units["mlp.gate_up_proj[up]"]) == list(range(128, 256))
    assert anatomy.fused == {
        "self_attn.qkv_proj": "q/k/v by rows 64/32/32",
        "mlp.gate_up_proj": "gate/up concatenated",
    }


def test_gpt2_c_attn_is_split_by_columns_with_its_bias():
    _, block = _units("gpt2")
    units = {u.name: u for u in block.units()}
    for i, part in enumerate("qkv"):  # Conv1D: weight (in, out); c_attn(x).split(hidden, dim=2)
        assert _cols(units[f"attn.c_attn[{part}]"]) == list(range(i * H, (i + 1) * H))
        assert _rows(units[f"attn.c_attn[{part}]"], "bias") == list(range(i * H, (i + 1) * H))
    assert [u.name for u in block.ffn[0]] == ["mlp.c_fc", "mlp.c_proj"]
    assert "attn.c_proj" in units  # the same leaf name in attention and MLP, two units


def test_gpt_neox_qkv_is_interleaved_head_by_head():
    _, block = _units("gpt_neox")
    units = {u.name: u for u in block.units()}
    # query_key_value(x).view(..., heads, 3 * head_dim).chunk(3, dim=-1)
    for i, part in enumerate("qkv"):
        want = [h * 3 * D + i * D + j for h in range(HEADS) for j in range(D)]
        assert _rows(units[f"attention.query_key_value[{part}]"]) == want
        assert _rows(units[f"attention.query_key_value[{part}]"], "bias") == want


def test_falcon_qkv_is_grouped_by_kv_head():
    _, block = _units("falcon")
    units = {u.name: u for u in block.units()}
    # new architecture: view(..., kv_heads, heads // kv_heads + 2, head_dim): q..q, k, v per group
    per = HEADS // KV + 2
    want = {
        "q": [g * per * D + j for g in range(KV) for j in range(HEADS // KV * D)],
        "k": [(g * per + per - 2) * D + j for g in range(KV) for j in range(D)],
        "v": [(g * per + per - 1) * D + j for g in range(KV) for j in range(D)],
    }
    for part, rows in want.items():
        assert _rows(units[f"self_attention.query_key_value[{part}]"]) == rows


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_moe_experts_are_groups_of_gate_up_down_and_routers_train_apart(family):
    anatomy, block = _units(family, block=1)
    model = tiny_model(family, vocab_size=64)
    experts = [g for g in block.ffn if "experts[" in g[0].name]
    cfg = tiny_config(family)
    n = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or cfg.n_routed_experts
    assert len(experts) == n
    gate_up = next(
        p for name, p in model.named_parameters() if name.endswith("layers.1.mlp.experts.gate_up_proj")
    )
    width = gate_up.shape[1] // 2
    for e, (gate, up, down) in enumerate(experts):
        assert (gate.name, up.name, down.name) == tuple(
            f"mlp.experts[{e}].{r}" for r in ("gate", "up", "down")
        )
        # F.linear(x, gate_up_proj[e]).chunk(2, dim=-1): rows of expert e, halves
        assert _rows(gate, "gate_up_proj") == list(range(e * 2 * width, e * 2 * width + width))
        assert _rows(up, "gate_up_proj") == list(range(e * 2 * width + width, (e + 1) * 2 * width))
        assert gate.numel == up.numel == down.numel == width * H
    shared = [g for g in block.ffn if "experts[" not in g[0].name]
    assert len(shared) == (1 if family in ("qwen2_moe", "deepseek_v3") else 0)
    moe_blocks = (0, 1) if family != "deepseek_v3" else (1,)  # DeepSeek's first layer is dense
    routers = {f"model.layers.{b}.mlp.gate.weight" for b in moe_blocks}
    if family == "qwen2_moe":
        routers |= {f"model.layers.{b}.mlp.shared_expert_gate.weight" for b in moe_blocks}
    assert set(anatomy.routers) == routers
    assert set(anatomy.experts) == {
        f"model.layers.{b}.mlp.experts.{n}" for b in moe_blocks for n in ("gate_up_proj", "down_proj")
    }


def test_latent_attention_matrices_stay_whole():
    anatomy, block = _units("deepseek_v3")
    assert [u.name for u in block.attention] == [
        "self_attn.q_a_proj",
        "self_attn.q_b_proj",
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_b_proj",
        "self_attn.o_proj",
    ]
    assert anatomy.fused == {}  # kv_a / kv_b feed k and v with different widths: one matrix each


def test_the_probe_leaves_the_model_as_it_was():
    model = tiny_model("phi3", vocab_size=64).to(torch.bfloat16)
    model.train()
    impl = model.config._attn_implementation
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    anatomy = model_anatomy(model)
    assert anatomy.fused  # found in bf16 too (the probed block runs in fp32)
    assert model.training and model.config._attn_implementation == impl
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n
    assert all(not h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_models_without_blocks_or_attention_are_named_in_the_error():
    with pytest.raises(AnatomyError, match="cannot find the transformer blocks of Holder"):
        holder = type("Holder", (torch.nn.Module,), {})()
        holder.a = torch.nn.Linear(2, 2)
        find_blocks(holder)
    model = tiny_model("llama", vocab_size=64)
    for layer in model.model.layers:
        layer.self_attn.__class__ = type("Mixer", (torch.nn.Module,), {"forward": layer.self_attn.forward})
    with pytest.raises(AnatomyError, match="llama: block model.layers.0 .* 'Attention'"):
        model_anatomy(model)
