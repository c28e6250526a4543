"""LongWanjuan's long-text quality metrics (arXiv 2402.13583): coherence, cohesion and complexity.

Statistical metrics (no model):

* complexity: the type-token ratio over the scoring LM's tokens (``ttr``) and over words
  (``word_ttr``), tokens per character, and line statistics of the lower-cased text split on
  ``\\n`` with empty lines dropped (length mean / std / median / max / min, line count, and the
  ``\\n``, ``,``, space and ``|`` counts, each also per character);
* cohesion: ``pronoun_rate`` = pronouns and demonstratives / words, ``connective_rate`` =
  discourse connectives / words.

LM-based coherence: the document's tokens are cut into ``chunks = len // long`` non-overlapping
windows of ``long`` tokens (the remainder dropped). In each window the last ``eval`` tokens are
scored twice, with the whole window as context ("wi", with long context) and with only the
window's last ``short`` tokens ("wo", without it). Per window :math:`ppl = \\exp(\\overline{nll})`
and :math:`acc = \\overline{[\\arg\\max = label]}`; each is averaged over the windows, and

.. math::

    acc_\\Delta = acc_{wi} - acc_{wo}, \\quad acc_{ratio} = acc_\\Delta / (acc_{wi} + 10^{-5}),
    \\quad ppl_\\Delta = ppl_{wo} - ppl_{wi}, \\quad ppl_{ratio} = ppl_\\Delta / (ppl_{wo} + 10^{-5}).

Note:
    What is ours rather than the released code's: the word tokenizer is a regular expression (the
    code uses ``nltk.word_tokenize``, not a dependency here); the English connective list (not in
    the released repository) and the exact pronoun list; ``word_ttr``; ``short > eval`` is required
    (with ``short == eval`` the first scored token would have no context at all in the short
    window); documents shorter than one window get NaN, not -1; the released code's bug that
    stores the perplexity ratio under ``acc_ratio`` is not reproduced. As in the released code,
    perplexity is the mean over windows of each window's ``exp(mean nll)``; ``nll_wi`` / ``nll_wo``
    (the mean nll over all scored tokens) are kept as well. Tokens are counted without the
    tokenizer's special tokens.
"""

from __future__ import annotations

import inspect
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "COHERENCE_KEYS",
    "CONNECTIVES",
    "PRONOUNS",
    "Windows",
    "coherence_scores",
    "connective_rate",
    "line_stats",
    "pronoun_rate",
    "text_metrics",
    "token_metrics",
    "type_token_ratio",
    "words",
]

# 39 English personal, possessive and reflexive pronouns and demonstratives (the released code
# counts 39; only part of its list is known, the rest is ours).
PRONOUNS = frozenset((
    "i", "me", "my", "mine", "myself", "you", "your", "yours", "yourself", "yourselves", "he", "him",
    "his", "himself", "she", "her", "hers", "herself", "it", "its", "itself", "we", "us", "our", "ours",
    "ourselves", "they", "them", "their", "theirs", "themselves", "this", "that", "these", "those",
    "who", "whom", "whose", "one",
))  # fmt: skip
# Discourse connectives (ours: the released repository has no English list). Multi-word ones are
# matched as a whole and count once; "and"/"or" are left out, they would swamp the rate.
CONNECTIVES = (
    "however", "therefore", "thus", "hence", "because", "since", "although", "though", "moreover",
    "furthermore", "consequently", "nevertheless", "nonetheless", "meanwhile", "otherwise",
    "instead", "whereas", "besides", "finally", "firstly", "secondly", "then", "so", "but", "yet",
    "also", "still", "accordingly", "likewise", "similarly", "indeed", "unless", "while",
    "as a result", "for example", "for instance", "in addition", "in contrast", "in fact",
    "in other words", "on the other hand", "as well as", "in particular", "that is",
)  # fmt: skip
_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_CONNECTIVE = re.compile(
    r"\b(?:"
    + "|".join(re.escape(c).replace(r"\ ", r"\s+") for c in sorted(CONNECTIVES, key=len, reverse=True))
    + r")\b"
)

COHERENCE_KEYS = ("acc_wi", "acc_wo", "acc_delta", "acc_ratio", "ppl_wi", "ppl_wo", "ppl_delta", "ppl_ratio",
                  "nll_wi", "nll_wo")  # fmt: skip
_EPS = 1e-5  # the released code's guard in both ratios


@dataclass(frozen=True)
class Windows:
    """The coherence windows in tokens: the paper's (4096, 2048, 1024) by default.

    Raises:
        ValueError: not ``long > short > eval >= 1``.
    """

    long: int = 4096
    """Tokens per window: the long context."""
    short: int = 2048
    """The window's last tokens that make the short context."""
    eval: int = 1024
    """The window's last tokens that are scored."""

    def __post_init__(self) -> None:
        for name in ("long", "short", "eval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"windows: {name} must be a positive number of tokens, got {v!r}")
        if not self.long > self.short > self.eval:
            raise ValueError(
                f"windows: need LONG > SHORT > EVAL (the short context must hold the scored tokens and "
                f"at least one token before them), got {self.long},{self.short},{self.eval}"
            )

    @classmethod
    def parse(cls, text: str) -> Windows:
        """``"LONG,SHORT,EVAL"``, e.g. ``"4096,2048,1024"``."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(
                f"--windows takes three token counts LONG,SHORT,EVAL (e.g. 4096,2048,1024), got {text!r}"
            )
        return cls(*(int(p) for p in parts))


def words(text: str) -> list[str]:
    """The lower-cased words and punctuation marks of ``text`` (a stand-in for ``nltk.word_tokenize``)."""
    return _WORD.findall(text.lower())


def type_token_ratio(tokens: Sequence[Any]) -> float:
    """Distinct tokens / tokens (NaN for no tokens): ``"a a a"``'s words give 1/3."""
    return len(set(tokens)) / len(tokens) if tokens else math.nan


def pronoun_rate(tokens: Sequence[str]) -> float:
    """Pronouns and demonstratives among ``tokens`` (from :func:`words`), NaN for no tokens."""
    return sum(t in PRONOUNS for t in tokens) / len(tokens) if tokens else math.nan


def connective_rate(text: str, n_words: int) -> float:
    """Discourse connectives in ``text`` per word (NaN for no words)."""
    return len(_CONNECTIVE.findall(text.lower())) / n_words if n_words else math.nan


def line_stats(text: str) -> dict[str, float]:
    """Line statistics of the lower-cased ``text`` split on ``\\n`` without its empty lines.

    The std is the population one (``numpy.std``'s default). Character counts are over the whole
    text; rates divide them by its length.
    """
    lines = [x for x in text.lower().split("\n") if x.strip()]
    lengths = [len(x) for x in lines]
    n = len(text)
    out: dict[str, float] = {"lines": float(len(lines))}
    if lengths:
        out.update(line_mean=statistics.fmean(lengths), line_std=statistics.pstdev(lengths),
                   line_median=float(statistics.median(lengths)), line_max=float(max(lengths)),
                   line_min=float(min(lengths)))  # fmt: skip
    else:
        out.update(dict.fromkeys(("line_mean", "line_std", "line_median", "line_max", "line_min"), math.nan))
    for name, ch in (("newline", "\n"), ("comma", ","), ("space", " "), ("pipe", "|")):
        count = text.count(ch)
        out[f"{name}s"] = float(count)
        out[f"{name}_rate"] = count / n if n else math.nan
    return out


def text_metrics(text: str) -> dict[str, float]:
    """Every statistical metric that needs no tokenizer: characters, words, ``word_ttr``,
    ``pronoun_rate``, ``connective_rate`` and :func:`line_stats`."""
    ws = words(text)
    out = {"chars": float(len(text)), "words": float(len(ws)), "word_ttr": type_token_ratio(ws),
           "pronoun_rate": pronoun_rate(ws), "connective_rate": connective_rate(text, len(ws))}  # fmt: skip
    out.update(line_stats(text))
    return out


def token_metrics(ids: Sequence[int], n_chars: int) -> dict[str, float]:
    """The LM-token metrics: ``tokens``, ``ttr`` (LongWanjuan's Complexity_TTR) and ``tokens_per_char``."""
    return {"tokens": float(len(ids)), "ttr": type_token_ratio(ids),
            "tokens_per_char": len(ids) / n_chars if n_chars else math.nan}  # fmt: skip


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _keeps_logits(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def _score(
    model: nn.Module, windows: torch.Tensor, n_eval: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(nll, correct)``, both ``(N, n_eval)`` fp32 on the CPU, of the last ``n_eval``
    tokens of each row of ``windows`` (``(N, T)``) given the tokens before them in the row."""
    device = _device(model)
    keep = _keeps_logits(model)
    nlls, hits = [], []
    for i in range(0, windows.shape[0], batch_size):
        rows = windows[i : i + batch_size].to(device)
        # The last token predicts nothing scored: feed T-1 tokens, whose last n_eval positions
        # predict the last n_eval tokens. logits_to_keep makes the model project only those
        # positions through its head: (B, n_eval, V) logits instead of (B, T, V).
        inputs = rows[:, :-1]
        out = model(input_ids=inputs, logits_to_keep=n_eval) if keep else model(input_ids=inputs)
        logits = out.logits[:, -n_eval:]
        targets = rows[:, -n_eval:]
        nll = torch.empty(targets.shape, dtype=torch.float32, device=device)
        hit = torch.empty(targets.shape, dtype=torch.float32, device=device)
        for j in range(logits.shape[0]):  # one row's fp32 copy at a time: bf16-safe at bounded memory
            row = logits[j].float()
            nll[j] = F.cross_entropy(row, targets[j], reduction="none")
            hit[j] = (row.argmax(-1) == targets[j]).float()
        nlls.append(nll.cpu())
        hits.append(hit.cpu())
    return torch.cat(nlls), torch.cat(hits)


def _nan_coherence() -> dict[str, float]:
    return dict.fromkeys(COHERENCE_KEYS, math.nan)


def coherence_scores(
    model: nn.Module, docs: Sequence[Sequence[int]], windows: Windows = Windows(), *, batch_size: int = 4
) -> list[dict[str, float]]:
    """LongWanjuan's coherence metrics of each document's token ids (see the module docstring).

    The windows of all ``docs`` are batched together, ``batch_size`` windows per forward, on the
    model's device and in its dtype; the losses are computed in fp32.

    Args:
        model: a causal LM returning ``.logits`` (Hugging Face style), in eval mode.
        docs: token ids per document (without special tokens).
        windows: the window sizes.
        batch_size: windows per forward pass (it bounds the ``(batch_size, eval, vocab)`` logits).

    Returns:
        Per document: ``chunks`` (windows scored) and :data:`COHERENCE_KEYS`, NaN when the document
        is shorter than one window.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of windows, got {batch_size!r}")
    n_long, n_short, n_eval = windows.long, windows.short, windows.eval
    chunks = [len(d) // n_long for d in docs]
    flat = [list(d[c * n_long : (c + 1) * n_long]) for d, n in zip(docs, chunks) for c in range(n)]
    results = []
    if flat:
        long = torch.tensor(flat, dtype=torch.long)
        # fp64 from here: ppl_delta is a difference of two perplexities of similar size
        nll_wi, acc_wi = (t.double() for t in _score(model, long, n_eval, batch_size))
        nll_wo, acc_wo = (t.double() for t in _score(model, long[:, -n_short:], n_eval, batch_size))
    at = 0
    for n in chunks:
        if n == 0:
            results.append({"chunks": 0.0, **_nan_coherence()})
            continue
        sl = slice(at, at + n)
        at += n
        ppl_wi = nll_wi[sl].mean(1).exp().mean().item()  # mean over windows of exp(mean nll)
        ppl_wo = nll_wo[sl].mean(1).exp().mean().item()
        a_wi, a_wo = acc_wi[sl].mean().item(), acc_wo[sl].mean().item()
        results.append({
            "chunks": float(n),
            "acc_wi": a_wi, "acc_wo": a_wo, "acc_delta": a_wi - a_wo,
            "acc_ratio": (a_wi - a_wo) / (a_wi + _EPS),
            "ppl_wi": ppl_wi, "ppl_wo": ppl_wo, "ppl_delta": ppl_wo - ppl_wi,
            "ppl_ratio": (ppl_wo - ppl_wi) / (ppl_wo + _EPS),
            "nll_wi": nll_wi[sl].mean().item(), "nll_wo": nll_wo[sl].mean().item(),
        })  # fmt: skip
    return results
