"""What the user-loop worker and its one-process reference share: the model and the data."""

import torch

STEPS = 4
VOCAB = 64


def tiny_model():
    """A 2-layer LLaMA (identical on every rank: seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def micro_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s half of global batch ``step`` (equal lengths, no padding: the mean of the
    two halves' mean losses is the global mean loss)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    return ids, ids.clone()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [micro_batch(step, r) for r in range(2)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
