"""Tiny random models of the Hugging Face families leantune supports, saved as local model
directories with a byte-level BPE tokenizer (real merges) and a Llama-3-style chat template.

Nothing is downloaded: configs are built from ``transformers.AutoConfig.for_model`` with a 2-layer,
hidden-64 shape, the tokenizer is trained in code on a small corpus. Used by the family tests and
by ``benchmarks/families.py`` (the CLI matrix).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# One shape for every family (2 layers, hidden 64, grouped-query attention where the family has it).
COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
# What each family needs besides COMMON (its own field names, MoE sizes), and the COMMON fields it
# does not have.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "qwen2_moe": {"num_experts": 4, "shared_expert_intermediate_size": 64, **MOE},
    "qwen3_moe": {"num_experts": 4, "head_dim": 16, **MOE},
    "mistral": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 32},
    "gemma3_text": {"head_dim": 16, "sliding_window": 32},
    "phi3": {},
    # dropout off (GPT-2 and OPT default to 0.1): runs are deterministic, rank counts comparable
    "gpt2": {"n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64, "dropout": 0.0},
    "falcon": {"num_kv_heads": 2, "new_decoder_architecture": True, "ffn_hidden_size": 128},
    "olmo2": {},
    "granite": {},
    "starcoder2": {},
    "smollm3": {},
    "deepseek_v3": {
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "n_group": 1,
        "topk_group": 1,
        "num_key_value_heads": 4,  # multi-head latent attention: one k/v per head
        **MOE,
    },
}
_NOT_IN: dict[str, tuple[str, ...]] = {
    "gpt2": ("intermediate_size", "num_key_value_heads"),
    "gpt_neox": ("num_key_value_heads",),
    "opt": ("intermediate_size", "num_key_value_heads"),
    "falcon": ("intermediate_size", "num_key_value_heads"),
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's template (without its date/tools preamble): the assistant turn ends with <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _corpus(seed: int = 0, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    words = [
        "the",
        "model",
        "learns",
        "to",
        "add",
        "sort",
        "reverse",
        "count",
        "numbers",
        "letters",
        "quickly",
        "and",
        "well",
    ]
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"add {a}+{b} = {a + b}. " + " ".join(rng.choices(words, k=6)))
        lines.append("user assistant system " + "".join(rng.choices("abcdefghij", k=8)))
    return lines


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a small corpus (real merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer)
    bos = SPECIALS[0]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, core.token_to_id(bos))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        additional_special_tokens=SPECIALS[2:4],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, *, vocab_size: int = 384, **overrides: Any):
    """The tiny config of ``family`` (a key of :data:`FAMILIES`)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in COMMON.items() if k not in _NOT_IN.get(family, ())}
    kwargs.update(FAMILIES[family])
    kwargs.update(vocab_size=vocab_size, pad_token_id=1, bos_token_id=0, eos_token_id=4)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, *, seed: int = 0, **overrides: Any):
    """A random model of ``family`` (fp32, eval-mode off, use_cache off)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    model.config.use_cache = False
    return model


def save_family(family: str, directory: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random ``family`` model with its tokenizer to ``directory`` (HF format)."""
    out = Path(directory)
    tok = build_tokenizer()
    model = tiny_model(family, seed=seed, vocab_size=len(tok), **overrides)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_chat_data(path: str | Path, n: int = 64, seed: int = 0) -> Path:
    """A JSONL file of short multi-turn chats (``messages``) for the family tests."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        word = "".join(rng.choices("abcdef", k=4))
        msgs = [
            {"role": "system", "content": "answer briefly"},
            {"role": "user", "content": f"add {a}+{b}"},
            {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": f"reverse {word}"},
            {"role": "assistant", "content": word[::-1]},
        ]
        lines.append(json.dumps({"messages": msgs}))
    p = Path(path)
    p.write_text("\n".join(lines) + "\n")
    return p
