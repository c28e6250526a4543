"""Multi-query associative recall: accuracy by prompt length, under a KV-cache policy.

The prompts are the built-in ``recall`` task's (:func:`leantune.data.tasks.make_recall`): key-digit
pairs scattered in filler, the keys queried at the end, the answers in query order. The first
answer is computed by the prefill itself, over the whole prompt; every later one is decoded from the
cache the policy kept, so eviction shows in the answers after the first (as in passkey retrieval,
where the first digit comes from the prefill too). With the queries in the prompt, the prefill can
already fetch every answer into the query tokens, which a recent window keeps; ``late_queries``
prefills only the filler and pairs (the policy evicts then, not knowing the question) and feeds the
queried keys and ``=`` through the kept cache afterwards, so every answer depends on what was kept.
Answers are decoded greedily, one prompt at a time, and scored per query (the character at the
query's place in the output) and per prompt (all answers right).

Lengths are in characters of the prompt, the token count under the built-in byte-level tokenizer
(bos not counted); with another tokenizer the token count is measured and reported.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from leantune.data.tasks import RECALL_PAIRS, RECALL_QUERIES, make_recall

__all__ = ["RecallResult", "evaluate_recall", "greedy_with_cache_bytes", "score_recall"]


@dataclass
class RecallResult:
    """Recall accuracy per prompt length for one KV-cache policy."""

    policy: str
    """The ``--kv-policy`` (with its budget when it evicts), e.g. ``nacl 0.2``."""
    lengths: list[int]
    """Prompt lengths in characters."""
    samples: int
    """Prompts per length."""
    queries: int
    """Queries per prompt."""
    correct: list[int]
    """Answers right per length (of ``samples * queries``)."""
    exact: list[int]
    """Prompts with every answer right per length (of ``samples``)."""
    kv_bytes: list[float]
    """Mean bytes of the KV cache right after the prefill, per length."""
    tokens: list[float]
    """Mean prompt tokens per length (bos included)."""
    by_query: list[list[int]] = field(default_factory=list)
    """Answers right per length and query index (the first comes from the prefill, the others
    from the kept cache)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """One per prompt: length, answer, output, correct answers, KV bytes, tokens."""
    late_queries: bool = False
    """The queries were fed after the prefill's eviction (see the module docstring)."""

    def accuracy(self) -> list[float]:
        """Share of answers right per length."""
        return [c / (self.samples * self.queries) for c in self.correct]

    def exact_accuracy(self) -> list[float]:
        """Share of prompts with every answer right per length."""
        return [e / self.samples for e in self.exact]

    def format(self) -> str:
        """A plain-text table: length, tokens, answer accuracy, exact prompts, KV-cache bytes."""
        when = ", queries after eviction" if self.late_queries else ""
        lines = [f"recall ({self.policy}{when}): {self.samples} prompts x {self.queries} queries per length",
                 f"{'length':>8} {'tokens':>8} {'answers':>8} {'prompts':>8} {'kv bytes':>10}"]  # fmt: skip
        for i, length in enumerate(self.lengths):
            lines.append(
                f"{length:>8} {self.tokens[i]:>8.0f} {self.accuracy()[i]:>8.1%} "
                f"{self.exact_accuracy()[i]:>8.1%} {self.kv_bytes[i]:>10.0f}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy(), "exact_accuracy": self.exact_accuracy()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecallResult:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def score_recall(output: str, answer: str) -> list[bool]:
    """Per query: whether ``output`` has the answer's character at that query's place."""
    return [i < len(output) and output[i] == a for i, a in enumerate(answer)]


def _cache_bytes(cache: Any) -> int:
    from leantune.kvcache.cache import cache_nbytes

    return cache_nbytes(cache)


@torch.no_grad()
def greedy_with_cache_bytes(
    model: torch.nn.Module,
    ids: list[int],
    max_new_tokens: int,
    eos_id: int | None,
    kv: Any = None,
    forced: Sequence[int] = (),
) -> tuple[list[int], int]:
    """Greedy continuation of ``ids`` (stopping at eos) under ``kv``, a
    :class:`leantune.kvcache.KVPolicy` (default: the full cache), and the bytes of the KV cache
    right after the prefill: what the policy kept of the prompt. ``forced`` tokens are fed after the
    prefill (see :func:`leantune.kvcache.greedy_continue`)."""
    from leantune.kvcache import KVPolicy, greedy_continue

    sizes: list[int] = []
    new = greedy_continue(
        model, ids, max_new_tokens, eos_id, kv if kv is not None else KVPolicy(),
        on_prefill=lambda cache: sizes.append(_cache_bytes(cache)), forced=forced,
    )  # fmt: skip
    return new, sizes[0]


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _policy_name(kv: Any) -> str:
    if kv is None:
        return "full"
    return kv.policy + (f" {kv.budget}" if getattr(kv, "budget", None) is not None else "")


def evaluate_recall(
    model: torch.nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    samples: int = 50,
    seed: int = 0,
    *,
    pairs: int = RECALL_PAIRS,
    queries: int = RECALL_QUERIES,
    kv: Any = None,
    late_queries: bool = False,
) -> RecallResult:
    """Recall accuracy of a causal LM at each prompt length, greedy decoding under ``kv``.

    Each length draws its prompts from its own generator seeded by ``(seed, length)``, so the same
    seed gives every policy the same prompts, and adding lengths does not change the others'. The
    model is put in eval mode for the run and restored afterwards.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer (prompts are tokenized with its special tokens, as in training).
        lengths: prompt lengths in characters (see :func:`leantune.data.tasks.make_recall`).
        samples: prompts per length.
        seed: base seed of the prompts.
        pairs: key-value pairs per prompt.
        queries: keys queried per prompt.
        kv: a :class:`leantune.kvcache.KVPolicy` (default: the full cache).
        late_queries: prefill the filler and pairs only (up to the newline), then feed the queried
            keys and ``=`` through the kept cache: the policy evicts without knowing the question.
            ``tokens`` and the budget are then those of the prefilled part.

    Raises:
        ValueError: an empty or non-positive length, a bad count, or a length too short for the pairs.
    """
    lengths = [_positive("lengths[]", n) for n in lengths]
    if not lengths:
        raise ValueError("lengths must not be empty")
    _positive("samples", samples)
    for n in lengths:  # every length checked before the first forward
        make_recall(random.Random(0), n, pairs, queries)
    was_training = model.training
    model.eval()
    correct, exact, nbytes, tokens, by_query = [], [], [], [], []
    records: list[dict[str, Any]] = []
    try:
        for length in lengths:
            rng = random.Random(f"recall:{seed}:{length}")  # str seeds hash stably across runs
            right = all_right = 0
            per_query = [0] * queries
            b = t = 0
            for _ in range(samples):
                item = make_recall(rng, length, pairs, queries)
                forced: list[int] = []
                if late_queries:
                    head, _, question = item.prompt.rpartition("\n")
                    ids = list(tokenizer(head + "\n")["input_ids"])
                    forced = list(tokenizer(question, add_special_tokens=False)["input_ids"])
                else:
                    ids = list(tokenizer(item.prompt)["input_ids"])
                new, cache_bytes = greedy_with_cache_bytes(
                    model, ids, len(item.response) + 1, tokenizer.eos_token_id, kv, forced
                )
                text = tokenizer.decode(new, skip_special_tokens=True)
                hits = score_recall(text, item.response)
                right += sum(hits)
                per_query = [c + h for c, h in zip(per_query, hits)]
                all_right += all(hits)
                b += cache_bytes
                t += len(ids)
                records.append(
                    {
                        "length": length,
                        "answer": item.response,
                        "output": text,
                        "correct": sum(hits),
                        "kv_bytes": cache_bytes,
                        "tokens": len(ids),
                    }  # fmt: skip
                )
            correct.append(right)
            exact.append(all_right)
            nbytes.append(b / samples)
            tokens.append(t / samples)
            by_query.append(per_query)
    finally:
        model.train(was_training)
    return RecallResult(_policy_name(kv), lengths, samples, queries, correct, exact, nbytes, tokens,
                        by_query=by_query, records=records, late_queries=late_queries)  # fmt: skip
