"""Long-context probes: passkey retrieval (needle in a haystack) and loss by token position.

Passkey retrieval (Mohtashami & Jaggi 2023, used by the RoPE scaling-law paper) hides a random
number at a chosen depth of repetitive filler text and asks for it at the end: a model retrieves it
only if attention still works across that distance. :func:`perplexity_by_position` is the other
standard probe - a model that extrapolates keeps a flat loss past its training length, one that
does not blows up there.

Prompts are assembled at the token level (pieces tokenized separately, ids concatenated) so that
their length is exact for any tokenizer; re-tokenizing the decoded text could merge tokens across
piece boundaries and change the length by a few tokens.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "FILLER_SENTENCES",
    "HEADER",
    "NEEDLE",
    "QUESTION",
    "PasskeyGrid",
    "PasskeySample",
    "PositionBucket",
    "evaluate_passkey",
    "make_passkey_sample",
    "perplexity_by_position",
    "plot_passkey_heatmap",
    "score_answer",
]

HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

_DIGITS = re.compile(r"\d+")


# --------------------------------------------------------------------------------------------------
# samples


@dataclass(frozen=True)
class PasskeySample:
    """One passkey prompt: ``header + filler[:k] + needle + filler[k:] + question`` as token ids."""

    prompt_ids: list[int]
    """The whole prompt, exactly the requested length."""
    answer: str
    """The pass key (decimal digits)."""
    needle_token_index: int
    """Index in ``prompt_ids`` of the needle's first token."""
    needle_len: int
    """Number of needle tokens."""
    filler_start: int
    """Index in ``prompt_ids`` where the filler begins (after the header, and bos if any)."""
    filler_len: int
    """Number of filler tokens (excluding the needle)."""
    depth: float
    """Requested depth in [0, 1]."""

    @property
    def actual_depth(self) -> float:
        """Where the needle really is: filler tokens before it / all filler tokens."""
        if self.filler_len == 0:
            return self.depth
        return (self.needle_token_index - self.filler_start) / self.filler_len


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _filler_block(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of one round of filler sentences, and the token offsets where sentences start."""
    # Every piece after the header starts with a space so that BPE tokenizers see a word boundary.
    texts = [" " + s for s in FILLER_SENTENCES]
    block = _ids(tokenizer, "".join(texts))
    # Prefix lengths give sentence starts without offset mappings (slow tokenizers have none).
    starts = [len(_ids(tokenizer, "".join(texts[:i]))) if i else 0 for i in range(len(texts))]
    return block, starts


def _pad_token(tokenizer: Any) -> int | None:
    """A token that decodes to whitespace and is one token on its own, to pad the filler exactly."""
    for text in ("\n", " "):
        ids = _ids(tokenizer, text)
        if len(ids) == 1:
            return ids[0]
    return None


def make_passkey_sample(
    tokenizer: Any,
    length: int,
    depth: float,
    rng: random.Random | int,
    *,
    digits: int = 5,
    add_bos: bool = False,
    header: str | None = HEADER,
) -> PasskeySample:
    """Build a passkey prompt of exactly ``length`` tokens with the needle at ``depth`` of the filler.

    Layout: ``[bos] [header] filler[:k] needle filler[k:] question``.

    * filler: the repeated :data:`FILLER_SENTENCES`, as many whole sentences as fit, then fewer than
      one sentence's worth of a one-token whitespace (``"\\n"`` or ``" "``) to reach the exact
      length; a tokenizer with no such token gets its last sentence cut short instead.
    * needle: ``"The pass key is N. Remember it. N is the pass key."``
    * question: ``"What is the pass key? The pass key is"``

    ``k`` is the filler sentence boundary closest to ``depth * filler_len`` (0 and ``filler_len``
    count as boundaries), so the needle never splits a sentence and ``actual_depth`` is within half
    a filler sentence of ``depth``.

    Args:
        tokenizer: any Hugging Face tokenizer (called with ``add_special_tokens=False``).
        length: total prompt length in tokens; exact, because pieces are joined as token ids.
        depth: needle position as a fraction of the filler, 0 (start) to 1 (just before the question).
        rng: a ``random.Random`` (or an int seed) drawing the pass key.
        digits: number of digits of the pass key (no leading zero).
        add_bos: start with the tokenizer's bos token (counted in ``length``); LLaMA-family models
            expect it.
        header: task instruction before the filler (default: the usual "There is an important info
            hidden ..." text); ``None`` for none, which allows shorter prompts.

    Raises:
        ValueError: bad ``depth`` / ``digits`` / ``length`` (e.g. shorter than header + needle + question).
    """
    if isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"length must be an int, got {length!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive int, got {digits!r}")
    if isinstance(rng, int) and not isinstance(rng, bool):
        rng = random.Random(rng)
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random or an int seed, got {type(rng).__name__}")

    answer = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    prefix: list[int] = []
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos token")
        prefix.append(int(tokenizer.bos_token_id))
    if header:
        prefix += _ids(tokenizer, header)
    needle = _ids(tokenizer, " " + NEEDLE.format(key=answer))
    question = _ids(tokenizer, " " + QUESTION)
    filler_len = length - len(prefix) - len(needle) - len(question)
    if filler_len < 0:
        raise ValueError(
            f"length must be at least {length - filler_len} tokens for this tokenizer "
            f"(header + needle + question), got {length}"
        )

    block, starts = _filler_block(tokenizer)
    reps = filler_len // len(block) + 1
    boundaries = [r * len(block) + s for r in range(reps) for s in starts if r * len(block) + s <= filler_len]
    pad = _pad_token(tokenizer)
    if pad is None:  # no one-token whitespace: cut the last sentence short instead
        filler = (block * reps)[:filler_len]
    else:  # whole sentences, then whitespace up to the exact length
        whole = boundaries[-1]
        filler = (block * reps)[:whole] + [pad] * (filler_len - whole)
    if boundaries[-1] != filler_len:
        boundaries.append(filler_len)
    target = depth * filler_len
    k = min(boundaries, key=lambda b: (abs(b - target), b))

    ids = prefix + filler[:k] + needle + filler[k:] + question
    assert len(ids) == length  # by construction; a failure here is a bug, not bad input
    return PasskeySample(
        prompt_ids=ids,
        answer=answer,
        needle_token_index=len(prefix) + k,
        needle_len=len(needle),
        filler_start=len(prefix),
        filler_len=filler_len,
        depth=float(depth),
    )


def score_answer(generated_text: str, answer: str) -> bool:
    """Exact match: the first run of digits in the continuation equals ``answer``.

    ``"12345."`` and ``" 12345 is it"`` match ``"12345"``; ``"1234"``, ``"123456"``, ``"12 345"``
    and text without digits do not.

    Raises:
        ValueError: ``answer`` is not a string of decimal digits.
    """
    if not isinstance(answer, str) or not answer.isdigit():
        raise ValueError(f"answer must be a string of digits, got {answer!r}")
    found = _DIGITS.search(generated_text)
    return found is not None and found.group() == answer


# --------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class PasskeyGrid:
    """Passkey accuracy on a ``lengths x depths`` grid (rows = lengths, columns = depths)."""

    lengths: list[int]
    depths: list[float]
    correct: list[list[int]]
    """``correct[i][j]``: samples answered right at ``lengths[i]``, ``depths[j]``."""
    samples_per_cell: int
    records: list[dict[str, Any]] = field(default_factory=list)
    """One dict per sample: length, depth, answer, generated text, correct."""

    @property
    def accuracy(self) -> list[list[float]]:
        """Fraction correct per cell."""
        return [[c / self.samples_per_cell for c in row] for row in self.correct]

    @property
    def mean_accuracy(self) -> float:
        """Fraction correct over the whole grid."""
        total = sum(map(sum, self.correct))
        return total / (self.samples_per_cell * len(self.lengths) * len(self.depths))

    def format(self) -> str:
        """A text table: one row per length, one column per depth, plus the row mean."""
        head = ["length \\ depth"] + [f"{d:g}" for d in self.depths] + ["mean"]
        rows = [
            [f"{n:,}"] + [f"{a:.2f}" for a in acc] + [f"{sum(acc) / len(acc):.2f}"]
            for n, acc in zip(self.lengths, self.accuracy)
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
        lines.append(f"passkey accuracy {self.mean_accuracy:.3f} ({self.samples_per_cell} samples per cell)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (includes ``accuracy``)."""
        return {**asdict(self), "accuracy": self.accuracy}

    def to_json(self, indent: int | None = 2) -> str:
        """The grid as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PasskeyGrid:
        """Inverse of :meth:`to_dict` (``accuracy`` is recomputed, not read)."""
        keys = ("lengths", "depths", "correct", "samples_per_cell", "records")
        return cls(**{k: data[k] for k in keys if k in data})


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@torch.no_grad()
def _greedy_continue(
    model: torch.nn.Module, ids: list[int], max_new_tokens: int, eos_id: int | None, kv: Any = None
) -> list[int]:
    """Greedy decoding with a KV cache (under ``kv``, a KV-cache policy, when given); stops at eos."""
    if kv is not None and kv.policy != "full":
        from leantune.kvcache.generation import greedy_continue

        return greedy_continue(model, ids, max_new_tokens, eos_id, kv)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    # Long prompts: only the last position's logits are needed, and (L, vocab) floats can be GBs.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=x, use_cache=True, **keep)
    new: list[int] = []
    for step in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        if eos_id is not None and tok == eos_id:
            break
        new.append(tok)
        if step + 1 < max_new_tokens:
            nxt = torch.tensor([[tok]], device=device)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return new


def evaluate_passkey(
    model: torch.nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples_per_cell: int = 5,
    seed: int = 0,
    max_new_tokens: int | None = None,
    *,
    digits: int = 5,
    add_bos: bool = False,
    header: str | None = HEADER,
    kv: Any = None,
) -> PasskeyGrid:
    """Passkey retrieval accuracy of a causal LM for every (length, depth), greedy decoding.

    Each cell draws its keys from its own generator seeded by ``(seed, length, depth)``, so adding
    lengths or depths does not change the samples of the others. The model is put in eval mode for
    the run and restored afterwards.

    Args:
        model: a Hugging Face causal LM (``forward`` taking ``logits_to_keep`` and a KV cache).
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        samples_per_cell: prompts per (length, depth).
        seed: base seed of the pass keys.
        max_new_tokens: tokens to generate per prompt (default ``digits + 3``).
        digits: pass key length in digits.
        add_bos: start prompts with the bos token (LLaMA-family models expect it).
        header: task instruction before the filler (see :func:`make_passkey_sample`).
        kv: a :class:`leantune.kvcache.KVPolicy` to decode under (default: the full cache).

    Returns:
        A :class:`PasskeyGrid` with per-sample records.
    """
    lengths = [_check_positive_int("lengths[]", n) for n in lengths]
    depths = [float(d) for d in depths]
    if not lengths or not depths:
        raise ValueError("lengths and depths must not be empty")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be in [0, 1], got {depths}")
    _check_positive_int("samples_per_cell", samples_per_cell)
    max_new = _check_positive_int(
        "max_new_tokens", max_new_tokens if max_new_tokens is not None else digits + 3
    )

    was_training = model.training
    model.eval()
    correct = [[0] * len(depths) for _ in lengths]
    records: list[dict[str, Any]] = []
    try:
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                rng = random.Random(f"{seed}:{length}:{depth}")  # str seeds hash stably across runs
                for _ in range(samples_per_cell):
                    sample = make_passkey_sample(
                        tokenizer, length, depth, rng, digits=digits, add_bos=add_bos, header=header
                    )
                    new = _greedy_continue(model, sample.prompt_ids, max_new, tokenizer.eos_token_id, kv)
                    text = tokenizer.decode(new, skip_special_tokens=True)
                    ok = score_answer(text, sample.answer)
                    correct[i][j] += ok
                    records.append(
                        {
                            "length": length,
                            "depth": depth,
                            "answer": sample.answer,
                            "output": text,
                            "correct": ok,
                        }
                    )
    finally:
        model.train(was_training)
    return PasskeyGrid(lengths, depths, correct, samples_per_cell, records)


def plot_passkey_heatmap(grid: PasskeyGrid, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG heatmap of passkey accuracy: lengths down, depths across, values annotated.

    Args:
        grid: the result of :func:`evaluate_passkey`.
        path: PNG file to write (parent directories are created).
        title: plot title (default: mean accuracy).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    acc = grid.accuracy
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(grid.depths), 1.2 + 0.5 * len(grid.lengths)), dpi=110)
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            # The colormap's ends are dark: white text stays readable there.
            color = "white" if a < 0.2 or a > 0.85 else "black"
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(grid.depths)), [f"{d:g}" for d in grid.depths])
    ax.set_yticks(range(len(grid.lengths)), [f"{n:,}" for n in grid.lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(title or f"passkey accuracy (mean {grid.mean_accuracy:.2f})")
    fig.colorbar(im, ax=ax, label="accuracy")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------
# loss by position


class PositionBucket(NamedTuple):
    """Mean next-token loss over the target positions ``start <= t < end``."""

    start: int
    end: int
    mean_nll: float
    perplexity: float


@torch.no_grad()
def perplexity_by_position(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    bucket_size: int,
    *,
    chunk_size: int = 1024,
) -> list[PositionBucket]:
    """Next-token loss per position bucket, from one forward pass.

    Position ``t`` is the index of the *predicted* token, so positions run from 1 (predicted from
    token 0) to ``L - 1``. Buckets are aligned to multiples of ``bucket_size``: ``[1, b), [b, 2b),
    ..., [.., L)``; each reports the mean NLL over its positions and over the batch, and
    ``exp(mean NLL)``. The sequence is used as is (no padding, no attention mask).

    Args:
        model: a causal LM returning ``.logits`` of shape ``(B, L, vocab)``.
        input_ids: ``(B, L)`` token ids (a 1-D tensor is treated as one sequence), ``L >= 2``.
        bucket_size: positions per bucket.
        chunk_size: positions per float32 cross-entropy call; bounds the extra memory when the
            logits are in half precision.

    Returns:
        One :class:`PositionBucket` per bucket, in order, covering positions ``1 .. L-1``.
    """
    _check_positive_int("bucket_size", bucket_size)
    _check_positive_int("chunk_size", chunk_size)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise ValueError("input_ids must be a 1-D or 2-D (batch, length) tensor")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    seq = ids.shape[1]
    if seq < 2:
        raise ValueError(f"input_ids must have at least 2 tokens per sequence, got {seq}")

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = ids.to(device)
        logits = model(input_ids=ids).logits  # (B, L, V)
        # nll[:, t-1] is the loss of predicting token t.
        parts = []
        for s in range(0, seq - 1, chunk_size):
            e = min(s + chunk_size, seq - 1)
            parts.append(
                F.cross_entropy(
                    logits[:, s:e].float().transpose(1, 2), ids[:, s + 1 : e + 1], reduction="none"
                )
            )
        nll = torch.cat(parts, dim=1)
    finally:
        model.train(was_training)

    buckets: list[PositionBucket] = []
    for start in range(0, seq, bucket_size):
        lo, hi = max(start, 1), min(start + bucket_size, seq)
        if lo >= hi:
            continue
        mean = float(nll[:, lo - 1 : hi - 1].mean())
        buckets.append(PositionBucket(lo, hi, mean, math.exp(mean)))
    return buckets
