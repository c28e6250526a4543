"""Rollouts: prompts in, sampled completions with everything PPO needs about them out.

A :class:`Rollout` keeps its sequences right-padded (``prompt + response``, ``[B, S]``) for the
forward passes, and its per-token quantities in *response space* ``[B, T]`` (column ``t`` is the
``t``-th response token of each row, ``mask`` marks the real ones; a response ends with its eos
token, which is an action too). :func:`response_index` maps response space into the model's
shifted outputs: the logits at position ``i`` predict token ``i + 1``, and the value read at
position ``i`` is that of the state before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from leantune.rl.losses import entropy_from_logits, token_logprobs

__all__ = ["Prompt", "PromptStream", "Rollout", "forward_policy", "generate", "response_index"]


@dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids, its text (what the reward sees) and a reference answer if any."""

    ids: list[int]
    text: str
    answer: str | None = None


class PromptStream:
    """An endless, seeded, resumable stream of prompt batches (reshuffled every epoch)."""

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int) -> None:
        if not prompts:
            raise ValueError("no prompts to roll out")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Prompt]:
        out = []
        while len(out) < self.batch_size:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffled()
            out.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return out

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.cursor / len(self.prompts)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != len(self.prompts):
            raise ValueError(
                f"the checkpoint's prompt set had {state['size']} prompts, this one {len(self.prompts)}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._shuffled()


@dataclass
class Rollout:
    """One batch of sampled completions (see the module docstring for the layout)."""

    prompts: list[Prompt]
    completions: list[str]
    sequences: list[list[int]]
    tokens: Tensor  # [B, S] right-padded prompt + response
    attention_mask: Tensor  # [B, S]
    index: Tensor  # [B, T] positions in the shifted outputs of the response tokens
    response: Tensor  # [B, T] the response token ids (0 where masked)
    mask: Tensor  # [B, T] bool
    truncated: Tensor  # [B] bool: no eos within max_new_tokens
    logp: Tensor | None = None  # [B, T] the policy's log-probs when sampled
    ref_logp: Tensor | None = None
    values: Tensor | None = None
    scores: Tensor | None = None  # [B] raw sequence rewards
    rewards: Tensor | None = None  # [B, T] per-token rewards (KL penalty + normalised score)
    advantages: Tensor | None = None
    returns: Tensor | None = None

    def rows(self, idx: Tensor) -> dict[str, Tensor]:
        """The tensors of rows ``idx`` needed by one minibatch update."""
        names = (
            "tokens",
            "attention_mask",
            "index",
            "response",
            "mask",
            "logp",
            "values",
            "advantages",
            "returns",
        )
        return {k: getattr(self, k)[idx] for k in names}


def response_index(prompt_lengths: list[int], width: int) -> Tensor:
    """``[B, width]`` positions ``P_b - 1 + t`` in the shifted outputs of row ``b``'s response token ``t``."""
    return torch.tensor(prompt_lengths).unsqueeze(1) - 1 + torch.arange(width).unsqueeze(0)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    device: torch.device,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool = False,
) -> Rollout:
    """Sample one completion per prompt (left-padded batch generation with the KV cache) and lay
    the result out as a :class:`Rollout`. The torch RNG drives the sampling: seed it for a
    reproducible rollout (the run's checkpoints hold its state)."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p.ids) :] = torch.tensor(p.ids)
        attn[i, width - len(p.ids) :] = 1
    kwargs: dict[str, Any] = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0,
    }  # fmt: skip
    try:
        out = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
            pad_token_id=pad, eos_token_id=eos, use_cache=True, **kwargs,
        )  # fmt: skip
    finally:
        model.train(was_training)
    responses, truncated = [], []
    for row in out[:, width:].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]  # the eos is the policy's last action
            truncated.append(False)
        else:
            truncated.append(True)
        responses.append(row)
    return layout(tokenizer, prompts, responses, truncated, device)


def layout(tokenizer: Any, prompts: list[Prompt], responses: list[list[int]], truncated: list[bool],
           device: torch.device) -> Rollout:  # fmt: skip
    """A :class:`Rollout` of given responses (token ids, each ending with eos unless truncated)."""
    if any(not r for r in responses):
        raise ValueError("every response needs at least one token")
    eos = tokenizer.eos_token_id
    sequences = [p.ids + r for p, r in zip(prompts, responses)]
    s_width = max(len(s) for s in sequences)
    t_width = max(len(r) for r in responses)
    tokens = torch.zeros((len(sequences), s_width), dtype=torch.long)
    attention = torch.zeros_like(tokens)
    response = torch.zeros((len(sequences), t_width), dtype=torch.long)
    mask = torch.zeros((len(sequences), t_width), dtype=torch.bool)
    for i, (s, r) in enumerate(zip(sequences, responses)):
        tokens[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        response[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    index = response_index([len(p.ids) for p in prompts], t_width).clamp(max=s_width - 2)
    completions = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True) for r in responses]
    return Rollout(
        prompts=prompts, completions=completions, sequences=sequences,
        tokens=tokens.to(device), attention_mask=attention.to(device), index=index.to(device),
        response=response.to(device), mask=mask.to(device),
        truncated=torch.tensor(truncated, device=device),
    )  # fmt: skip


def _response_logits(logits: Tensor, index: Tensor) -> Tensor:
    return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def forward_policy(
    model: nn.Module, batch: dict[str, Tensor], temperature: float, *, entropy: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The policy's log-probs of the response tokens ``[B, T]`` at ``temperature``, their
    entropies (when asked) and, for a :class:`~leantune.rl.values.PolicyWithValueHead`, the values."""
    out = model(input_ids=batch["tokens"], attention_mask=batch["attention_mask"])
    logits, values = out if isinstance(out, tuple) else (out.logits, None)
    picked = _response_logits(logits, batch["index"])
    if temperature != 1.0:
        picked = picked / temperature
    logp = token_logprobs(picked, batch["response"])
    ent = entropy_from_logits(picked) if entropy else None
    if values is not None:
        values = values.gather(1, batch["index"])
    return logp, ent, values


def forward_values(critic: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """A separate critic's values of the states before each response token ``[B, T]``."""
    values = critic(batch["tokens"], batch["attention_mask"])
    return values.gather(1, batch["index"])
