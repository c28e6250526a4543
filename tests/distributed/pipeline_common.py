"""What the pipeline worker and its one-process reference share: model, data, optimizers, cases."""

import torch

from leantune.optim import LOMO, AdaLomo, InBackward

STEPS = 3
VOCAB = 64
BATCH, SEQ = 4, 12
CLIP = 0.5

OPTIMIZERS = {
    "adalomo": lambda params, **kw: AdaLomo(params, lr=0.05, **kw),
    "lomo-clip": lambda params, **kw: LOMO(params, lr=0.05, clip_grad_norm=CLIP, **kw),
    # plain SGD: its update scales with the gradient, so a loss scale the stages do not undo shows
    "lomo-dynamic-scale": lambda params, **kw: LOMO(params, lr=0.5, loss_scale="dynamic", **kw),
    "adamw-in-backward": lambda params, **kw: InBackward(
        torch.optim.AdamW, params, lr=1e-2, weight_decay=0.1, **kw
    ),
}
# (optimizer, schedule, micro-batches): every optimizer under both schedules
CASES = [(o, s, n) for o in OPTIMIZERS for s, n in (("gpipe", 2), ("1f1b", 4))]


def case_name(case) -> str:
    return "-".join(map(str, case))


def tiny_model(layers: int = 4, tied: bool = False):
    """A random LLaMA (identical on every rank: seeded), fp32, untied unless asked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded global batch: each micro-batch has a different number of label tokens, so
    a per-micro-batch mean loss would not average to the batch's mean."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (BATCH,), generator=g)
    pad = torch.arange(SEQ)[None, :] >= lengths[:, None]
    ids[pad] = 0
    labels = ids.masked_fill(pad, -100)
    return ids, labels
