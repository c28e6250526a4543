"""What the decoding loops share: a model with its KV cache (:class:`Runner`), statistics, errors,
the draft/target compatibility check. Batch size 1 throughout (one prompt at a time, no padding)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from leantune.speculative.clock import AnyClock

__all__ = [
    "DraftError",
    "GenResult",
    "GenStats",
    "IncompatibleDraftError",
    "Runner",
    "check_compatible",
]


class IncompatibleDraftError(ValueError):
    """The draft cannot propose tokens for the target: different tokenizers or vocabularies."""


class DraftError(RuntimeError):
    """The draft model failed during a generation; the request ends, the target stays usable."""


def _vocab_of(tokenizer: Any) -> dict[str, int] | None:
    try:
        return dict(tokenizer.get_vocab())
    except (AttributeError, NotImplementedError):
        return None


def check_compatible(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    target_tokenizer: Any = None,
    draft_tokenizer: Any = None,
) -> None:
    """Refuse a draft whose token ids do not mean the target's: the acceptance rule compares
    ``p(x)`` and ``q(x)`` for the *same id* ``x``, so both models must share the tokenizer and the
    output vocabulary size.

    Raises:
        IncompatibleDraftError: with what differs.
    """
    tv = getattr(target.config, "vocab_size", None)
    dv = getattr(draft.config, "vocab_size", None)
    if tv != dv:
        raise IncompatibleDraftError(
            f"the draft's vocabulary ({dv} ids) differs from the target's ({tv} ids): speculative "
            "decoding needs a draft with the target's tokenizer"
        )
    if target_tokenizer is None or draft_tokenizer is None:
        return
    a, b = _vocab_of(target_tokenizer), _vocab_of(draft_tokenizer)
    if a is not None and b is not None and a != b:
        only = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise IncompatibleDraftError(
            f"the draft's tokenizer differs from the target's ({len(b)} vs {len(a)} tokens; e.g. "
            f"{only}): speculative decoding needs a draft with the target's tokenizer"
        )
    for name in ("eos_token_id", "bos_token_id"):
        if getattr(target_tokenizer, name, None) != getattr(draft_tokenizer, name, None):
            raise IncompatibleDraftError(f"the draft's tokenizer has another {name} than the target's")


class Runner:
    """One model, its KV cache and its lane of the virtual clock.

    Invariant kept by the loops: the cache holds a prefix of the current sequence; :meth:`feed`
    runs the model on the uncached rest, :meth:`rollback` crops the cache to a shorter prefix
    (``DynamicCache.crop`` with a negative count removes that many positions from every layer).
    """

    def __init__(self, model: torch.nn.Module, lane: str, clock: AnyClock | None = None) -> None:
        self.model = model
        self.lane = lane
        self.clock = clock
        self.device = next(model.parameters()).device
        self.cache: Any = None
        self.forwards = 0
        self.seconds = 0.0  # wall time in this model's forwards

    @property
    def length(self) -> int:
        """Positions in the cache."""
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    @torch.no_grad()
    def forward(self, tokens: list[int]) -> torch.Tensor:
        """Logits ``(len(tokens), V)`` (float32, CPU) of ``tokens`` appended to the cached prefix."""
        if not tokens:
            raise ValueError("a forward needs at least one token")
        t0 = time.perf_counter()
        x = torch.tensor([tokens], device=self.device)
        out = self.model(input_ids=x, cache=self.cache, use_cache=True)
        self.cache = out.cache
        logits = out.logits[0, -len(tokens) :].float().cpu()  # .cpu() waits for the device
        self.seconds += time.perf_counter() - t0
        self.forwards += 1
        if self.clock is not None:
            self.clock.charge(self.lane, len(tokens))
        return logits

    def feed(self, seq: list[int]) -> torch.Tensor:
        """Run the uncached suffix ``seq[self.length:]`` (at least one token); its logits."""
        n = self.length
        if n >= len(seq):
            raise ValueError(f"nothing to feed: the cache holds {n} positions of a {len(seq)}-token sequence")
        return self.forward(seq[n:])

    def rollback(self, n: int) -> None:
        """Crop the cache to its first ``n`` positions (nothing when it holds ``<= n``)."""
        extra = self.length - n
        if extra > 0:
            self.cache.crop(-extra)

    def snapshot(self, base: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of every layer's keys/values at positions ``base..end-1`` (a drafted branch)."""
        return [
            (lay.keys[..., base:end, :].clone(), lay.values[..., base:end, :].clone())
            for lay in self.cache.layers
        ]

    def restore(self, base: int, snap: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Crop to ``base`` and append a :meth:`snapshot` taken at ``base``."""
        self.rollback(base)
        for lay, (k, v) in zip(self.cache.layers, snap):
            lay.keys = torch.cat([lay.keys, k], dim=-2)
            lay.values = torch.cat([lay.values, v], dim=-2)


@dataclass
class GenStats:
    """What one generation did. ``drafted``/``accepted``: draft tokens put to verification and kept
    (DuoDecoding counts the first token of each round's chosen-or-not sequence as drafted and as
    accepted on a first-token hit)."""

    method: str
    gamma: int = 0
    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per target forward
    k_hist: dict[int, int] = field(default_factory=dict)  # DuoDecoding: sequences drafted per round
    first_checks: int = 0
    first_hits: int = 0
    ttft_s: float | None = None
    wall_s: float = 0.0
    virtual_ttft_s: float | None = None
    virtual_s: float | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per target forward (``(1 - a^(g+1)) / (1 - a)`` for SD)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "accept_lengths"}
        d["acceptance_rate"] = self.acceptance_rate
        d["mean_accepted"] = self.mean_accepted
        return d


@dataclass
class GenResult:
    tokens: list[int]  # the new tokens, cut before eos and at max_new_tokens
    stats: GenStats


def done(new: list[int], max_new_tokens: int, eos_id: int | None) -> bool:
    return len(new) >= max_new_tokens or (eos_id is not None and eos_id in new)


def finish(new: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return new[:max_new_tokens]
