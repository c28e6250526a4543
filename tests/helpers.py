"""Test helpers: tiny random LLaMA models and batches, built locally (nothing is downloaded)."""

from __future__ import annotations

import torch


def tiny_llama(
    seed: int = 0,
    *,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
    attn: str = "sdpa",
    device: torch.device | str = "cpu",
    vocab: int = 48,
):
    """A 2-layer LLaMA with hidden size 32 and grouped-query attention (random init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    # initialised on the CPU whatever the device, so that a seed gives the same weights everywhere
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.config.use_cache = False
    return model


def byte_llama(vocab: int, layers: int, seed: int):
    """A random LLaMA for the byte tokenizer's vocabulary (2 heads, 1 KV head, 256 positions): the
    target and draft models of the speculative-decoding tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def batch(seed: int = 0, *, size: int = 4, length: int = 12, vocab: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (size, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def loss_of(model, b) -> torch.Tensor:
    """The model's loss on batch ``b``, moved to the model's device (batches are made on the CPU)."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in b.items()}).loss


def stop_at(step: int):
    """A trainer hook that asks the run to stop (as SIGTERM would) at the end of ``step``: the
    trainer saves a checkpoint there and returns an interrupted summary."""
    from leantune.trainer import TrainerHook

    class StopAt(TrainerHook):
        def on_step_end(self, trainer, done, result):
            if done == step:
                trainer.request_stop()

    return StopAt()
