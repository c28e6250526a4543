"""The value models of PPO: a separate critic (a sequence-classification model read per token) or
a value head on the policy itself, and the last-token scores of a reward model.

A Hugging Face ``*ForSequenceClassification`` model is a backbone (``base_model_prefix``) plus a
``score`` head that the model applies at the last token; read at every position instead it gives
one value per state, which is how TRL and DeepSpeed-Chat build their critic, and why a reward model
is a natural initialisation for it (PPO-max).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Critic", "PolicyWithValueHead", "build_critic", "last_token_values"]


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if backbone is None or head is None:
        raise ValueError(
            f"{type(model).__name__} is not a sequence-classification model with a backbone and a "
            "score head: give rl.critic / rl.reward a *ForSequenceClassification model directory"
        )
    return backbone, head


class Critic(nn.Module):
    """Per-token values ``[B, S]`` from a sequence-classification model (one label)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _backbone_and_head(model)  # refuse a model without them now
        self.model = model  # the only submodule: one name per parameter in the optimizer's state

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        backbone, head = _backbone_and_head(self.model)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head(hidden).squeeze(-1).float()


class PolicyWithValueHead(nn.Module):
    """The policy and a linear value head on its last hidden states (``rl.critic=shared``): one
    forward gives the logits and the values, one backward updates both."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        hidden = policy.config.hidden_size
        param = next(policy.parameters())
        self.v_head = nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
        nn.init.zeros_(self.v_head.weight)  # values start at 0; the head learns them first
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.v_head(out.hidden_states[-1]).squeeze(-1).float()


def _pad_right(sequences: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in sequences])
    return ids.to(device), mask.to(device), last.to(device)


@torch.no_grad()
def last_token_values(model: nn.Module, sequences: list[list[int]], device: torch.device,
                      batch_size: int = 32) -> list[float]:  # fmt: skip
    """A sequence-classification model's score of each token sequence, read at its last token
    (what ``model(...).logits`` gives for a right-padded batch with ``pad_token_id`` set)."""
    critic = Critic(model)
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        ids, mask, last = _pad_right(sequences[start : start + batch_size], device)
        values = critic(ids, mask)
        out += values[torch.arange(len(last), device=device), last].tolist()
    return out


def _sequence_classifier(config: Any, tokenizer: Any) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    config = type(config).from_dict(config.to_dict())
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    return AutoModelForSequenceClassification.from_config(config)


def build_critic(spec: str, policy: nn.Module, tokenizer: Any, *, reward_dir: str | None, seed: int,
                 vocab_size: int) -> tuple[Critic | None, str]:  # fmt: skip
    """The critic ``rl.critic`` names and a description of it; ``None`` for ``shared`` (the caller
    wraps the policy in :class:`PolicyWithValueHead`).

    ``auto``: the reward model's weights when the reward is a model, else the policy's backbone
    with a zero value head; a directory: that model; a preset name: a fresh model of that shape.
    """
    from transformers import AutoModelForSequenceClassification

    from leantune.models import PRESETS, check_model_dir, preset_config

    if spec == "shared":
        return None, "a value head on the policy (rl.critic=shared)"
    dtype = next(policy.parameters()).dtype
    path = reward_dir if spec == "auto" else (spec if spec not in PRESETS else None)
    if path is not None:
        check_model_dir(path, "rl.critic")
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, use_safetensors=True
        )
        what = "the reward model" if spec == "auto" else path
        return Critic(model), f"{what} with its score head read per token"
    if spec in PRESETS:
        torch.manual_seed(seed + 1)
        model = _sequence_classifier(preset_config(spec, vocab_size=vocab_size), tokenizer).to(dtype)
        return Critic(model), f"a fresh {spec} model with a value head"
    # auto without a reward model: the policy's own initial weights under a zero head
    model = _sequence_classifier(policy.config, tokenizer).to(dtype)
    backbone, head = _backbone_and_head(model)
    policy_backbone = getattr(policy, getattr(policy, "base_model_prefix", "model"))
    backbone.load_state_dict(policy_backbone.state_dict())
    nn.init.zeros_(head.weight)
    if getattr(head, "bias", None) is not None:
        nn.init.zeros_(head.bias)
    return Critic(model), "a copy of the policy's initial weights with a zero value head"
