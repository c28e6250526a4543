"""What a KV-cache policy keeps: the validated options and their resolution against a prompt length.

A :class:`KVPolicy` is the typed form of the ``--kv-*`` options. It is validated when built, so a
bad budget fails before any model is loaded; a budget given as a fraction of the prompt can only be
checked against ``sink + recent`` once the prompt length is known, in :meth:`KVPolicy.resolve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from leantune.kvcache.longcache import LongCacheConfig

__all__ = ["EVICTION_POLICIES", "POLICIES", "Budget", "KVPolicy", "parse_budget"]

EVICTION_POLICIES = ("nacl", "streaming", "random")
"""Policies that evict once, at prefill, to a fixed budget per KV head."""
POLICIES = ("full", *EVICTION_POLICIES, "longcache")


def parse_budget(text: str | int | float) -> int | float:
    """``--kv-budget`` as a token count (``"512"``, 512) or a fraction of the prompt (``"0.2"``, 0.2).

    A number written with a decimal point or an exponent, or any float, is a fraction in (0, 1];
    a whole number is a token count.

    Raises:
        ValueError: zero, negative, a fraction above 1, or not a number.
    """
    if isinstance(text, bool):
        raise ValueError(f"--kv-budget must be a token count or a fraction, got {text!r}")
    if isinstance(text, str):
        s = text.strip()
        try:
            value: int | float = int(s) if s.lstrip("+-").isdigit() else float(s)
        except ValueError:
            raise ValueError(
                f"--kv-budget must be a token count (e.g. 512) or a fraction of the prompt (e.g. 0.2), "
                f"got {text!r}"
            ) from None
    elif isinstance(text, (int, float)):
        value = text
    else:
        raise ValueError(f"--kv-budget must be a token count or a fraction, got {text!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"--kv-budget as a fraction of the prompt must lie in (0, 1], got {text!r} "
                "(a whole number is a token count)"
            )
        return value
    if value < 1:
        raise ValueError(f"--kv-budget must be at least 1 token, got {text!r}")
    return value


class Budget(NamedTuple):
    """Tokens kept per KV head for one prompt, by part; they sum to :attr:`total`."""

    sink: int
    """The first tokens of the prompt (attention sinks)."""
    recent: int
    """The last tokens of the prompt."""
    scored: int
    """Middle tokens kept by the highest proxy score (nacl) - 0 for the other policies."""
    sampled: int
    """Middle tokens drawn at random (nacl: with probability softmax(score); random: uniformly)."""

    @property
    def total(self) -> int:
        return self.sink + self.recent + self.scored + self.sampled


@dataclass(frozen=True)
class KVPolicy:
    """How the KV cache of a generation is kept (the ``--kv-*`` options).

    ``full`` keeps everything (transformers' own cache). ``nacl``, ``streaming`` and ``random`` evict
    once, at prefill, to ``budget`` tokens per KV head, and keep every token decoded afterwards:

    * ``nacl`` (Chen et al., ACL 2024): sink + recent + the top middle tokens by the attention the
      last ``proxies`` prompt positions pay them + a sample of the rest drawn with probability
      softmax(score) without replacement; ``random_fraction`` of the middle budget is sampled.
      ``random_fraction=0`` is "proxy-only", ``1`` is "random-only" in the paper's ablation.
    * ``streaming`` (StreamingLLM): the first ``sink`` tokens and the last ``budget - sink``.
    * ``random``: sink + recent + a uniform sample of the middle.

    ``longcache`` keeps every token but attends to a bounded selection (see
    :class:`leantune.kvcache.longcache.LongCacheConfig`); it takes no budget.
    """

    policy: str = "full"
    """One of :data:`POLICIES`."""
    budget: int | float | None = None
    """Tokens kept per KV head (int) or a fraction of the prompt length in (0, 1] (float)."""
    sink: int = 4
    """First prompt tokens always kept."""
    recent: int = 16
    """Last prompt tokens always kept (nacl, random)."""
    proxies: int = 16
    """nacl: the last prompt positions whose attention scores the middle tokens."""
    random_fraction: float = 0.37
    """nacl: share of the middle budget sampled rather than taken by score (NACL's defaults keep
    12% of the prompt by score and 7% at random: 0.07 / 0.19 = 0.37)."""
    seed: int = 0
    """Seed of the random draws (nacl, random); the same seed gives the same cache."""
    longcache: LongCacheConfig | None = None
    """longcache: the windows (default :class:`~leantune.kvcache.longcache.LongCacheConfig`)."""
    train_length: int | None = None
    """longcache: the training length positions must stay below (default: the model config's
    ``max_position_embeddings``)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"--kv-policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name, value, low in (
            ("sink", self.sink, 0),
            ("recent", self.recent, 0),
            ("proxies", self.proxies, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--kv-{name} must be an int >= {low}, got {value!r}")
        rf = self.random_fraction
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 0.0 <= rf <= 1.0:
            raise ValueError(f"--kv-random-fraction must be a number in [0, 1], got {rf!r}")
        if self.policy in EVICTION_POLICIES:
            if self.budget is None:
                raise ValueError(
                    f"--kv-policy {self.policy} needs --kv-budget (tokens, or a fraction like 0.2)"
                )
            object.__setattr__(self, "budget", parse_budget(self.budget))
            if isinstance(self.budget, int):
                self._check_floor(self.budget)
        elif self.budget is not None:
            raise ValueError(
                f"--kv-budget applies to {', '.join(EVICTION_POLICIES)}, not --kv-policy {self.policy}"
            )
        if self.policy == "longcache":
            from leantune.kvcache.longcache import LongCacheConfig

            if self.longcache is None:
                object.__setattr__(self, "longcache", LongCacheConfig())
            tl = self.train_length
            if tl is not None and (isinstance(tl, bool) or not isinstance(tl, int) or tl < 1):
                raise ValueError(f"--kv-train-length must be a positive int, got {tl!r}")
            if tl is not None:
                self.longcache.check(tl)
        elif self.longcache is not None:
            raise ValueError(f"LongCache windows apply to --kv-policy longcache, not {self.policy}")

    @property
    def evicts(self) -> bool:
        """Whether this policy evicts at prefill."""
        return self.policy in EVICTION_POLICIES

    def _floor(self) -> int:
        return self.sink + (self.recent if self.policy != "streaming" else 0)

    def _check_floor(self, tokens: int, prompt_len: int | None = None) -> None:
        floor = self._floor()
        if tokens < max(floor, 1):
            what = "--kv-sink + --kv-recent" if self.policy != "streaming" else "--kv-sink"
            of = f" ({self.budget} of a {prompt_len}-token prompt)" if prompt_len is not None else ""
            raise ValueError(
                f"--kv-budget {tokens} tokens{of} is below {what} = {floor}: "
                "raise the budget or lower the sink / recent windows"
            )

    def budget_tokens(self, prompt_len: int) -> int:
        """The budget in tokens for a prompt of ``prompt_len`` tokens (``floor(fraction * n)``)."""
        if not self.evicts:
            return prompt_len
        assert self.budget is not None
        if isinstance(self.budget, float):
            return math.floor(self.budget * prompt_len)
        return self.budget

    def resolve(self, prompt_len: int) -> Budget | None:
        """The per-part token counts for a prompt of ``prompt_len`` tokens, or ``None`` when nothing
        is evicted (a budget of at least the prompt length, or a policy that does not evict).

        Raises:
            ValueError: the budget, as tokens of this prompt, is below ``sink + recent``.
        """
        if not self.evicts:
            return None
        tokens = self.budget_tokens(prompt_len)
        if tokens >= prompt_len:
            return None
        self._check_floor(tokens, prompt_len)
        if self.policy == "streaming":
            return Budget(self.sink, tokens - self.sink, 0, 0)
        middle = tokens - self.sink - self.recent
        if self.policy == "random":
            return Budget(self.sink, self.recent, 0, middle)
        sampled = round(self.random_fraction * middle)
        return Budget(self.sink, self.recent, middle - sampled, sampled)
