"""The footprint (what a forward saves for backward, counted on fake tensors) against the oracle:
the distinct storages a real forward of the same tiny model saves, block by block."""

from __future__ import annotations

import pytest
import torch

from leantune.anatomy import _is_projection, find_blocks
from leantune.footprint import model_footprint, parameter_count
from leantune.models import resolve_attention
from tests.families import FAMILIES, MOE_FAMILIES, tiny_config

SEQ = 48  # neither of the probe's lengths: the fit is checked too


def real_saved(family: str, dtype: str, padded: bool, **overrides) -> tuple[list[int], int, torch.nn.Module]:
    """Bytes a real training forward saves per block and outside the blocks (parameters and autocast's
    bf16 weight copies excepted, which the estimate books under weights), as the trainer runs it:
    no attention mask unless the batch is padded."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, vocab_size=96, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=resolve_attention(cfg, "auto"))
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).train()
    model.config.use_cache = False
    blocks = find_blocks(model)
    keep = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, tuple[int, int]] = {}
    where = [-1]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in keep and key not in seen:
            seen[key] = (where[-1], t.untyped_storage().nbytes())
        return t

    def enter(i):
        def hook(module, args):
            where.append(i)

        return hook

    def leave(module, args, output):
        where.pop()

    for i, (_, block) in enumerate(blocks):
        block.register_forward_pre_hook(enter(i))
        block.register_forward_hook(leave)
    ids = torch.randint(0, 96, (1, SEQ))
    kwargs = {}
    if padded:
        mask = torch.ones_like(ids)
        mask[0, -12:] = 0
        kwargs["attention_mask"] = mask
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "mixed")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(input_ids=ids, **kwargs)
    per_block = [sum(n for b, n in seen.values() if b == i) for i in range(len(blocks))]
    tail = sum(n for b, n in seen.values() if b < 0)
    if dtype == "mixed":
        inside = set()
        for i, (_, block) in enumerate(blocks):
            for m in block.modules():
                if _is_projection(m):
                    per_block[i] -= 2 * m.weight.numel()
                    inside.add(id(m))
        tail -= sum(
            2 * m.weight.numel() for m in model.modules() if _is_projection(m) and id(m) not in inside
        )
    return per_block, tail, model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_footprint_equals_a_real_forward_in_fp32(family):
    per_block, tail, model = real_saved(family, "fp32", padded=False)
    fp = model_footprint(tiny_config(family, vocab_size=96), "fp32")
    assert [layer.name for layer in fp.layers] == [n for n, _ in find_blocks(model)]
    for layer, want in zip(fp.layers, per_block):
        assert layer.saved(SEQ) == pytest.approx(want, rel=0.005), layer.name
    assert fp.tail(SEQ) == pytest.approx(tail, rel=0.005)
    assert parameter_count(fp) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("family", "dtype", "padded"),
    [
        ("llama", "bf16", False),
        ("gpt2", "bf16", False),
        ("mixtral", "bf16", False),
        ("deepseek_v3", "bf16", False),
        ("llama", "mixed", False),
        ("phi3", "mixed", False),
        ("gemma2", "mixed", False),  # eager attention: L x L probabilities, the quadratic term
        ("qwen2_moe", "mixed", False),
        ("llama", "fp32", True),
        ("gpt_neox", "fp32", True),
        ("mixtral", "fp32", True),
    ],
)
def test_footprint_equals_a_real_forward_in_other_modes(family, dtype, padded):
    per_block, tail, _ = real_saved(family, dtype, padded)
    fp = model_footprint(tiny_config(family, vocab_size=96), dtype, padded=padded)
    for layer, want in zip(fp.layers, per_block):
        assert layer.saved(SEQ) == pytest.approx(want, rel=0.01), layer.name
    assert fp.tail(SEQ) == pytest.approx(tail, rel=0.01)


def test_dropout_masks_are_counted():
    """GPT-2's and OPT's own defaults (dropout 0.1): the masks are saved in train mode."""
    for family, drop in (
        ("gpt2", {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}),
        ("opt", {"dropout": 0.1}),
    ):
        per_block, tail, _ = real_saved(family, "fp32", False, **drop)
        fp = model_footprint(tiny_config(family, vocab_size=96, **drop), "fp32")
        without = model_footprint(tiny_config(family, vocab_size=96), "fp32")
        for layer, want, plain in zip(fp.layers, per_block, without.layers):
            assert layer.saved(SEQ) == pytest.approx(want, rel=0.005) and layer.saved(SEQ) > plain.saved(SEQ)


def test_eager_attention_is_quadratic_and_sdpa_linear():
    eager = model_footprint(tiny_config("gemma2", vocab_size=96), "fp32")
    sdpa = model_footprint(tiny_config("llama", vocab_size=96), "fp32")
    assert all(layer.per_token_sq > 0 for layer in eager.layers)
    assert all(layer.per_token_sq == 0 for layer in sdpa.layers)


def test_moe_layers_count_their_routed_tokens():
    fp = model_footprint(tiny_config("deepseek_v3", vocab_size=96), "fp32")
    dense, moe = fp.layers  # DeepSeek's first layer is dense (first_k_dense_replace=1)
    assert fp.experts and moe.per_token > dense.per_token
    assert set(MOE_FAMILIES) <= set(FAMILIES)


def test_unknown_dtype_and_family_are_refused():
    with pytest.raises(ValueError, match="Invalid dtype"):
        model_footprint(tiny_config("llama"), "fp8")
    with pytest.raises(ValueError, match="no model_type"):
        model_footprint({"hidden_size": 64}, "fp32")
