"""Turning records into token sequences with loss masks, packing and an over-length policy.

* instruction: ``prompt + response + eos``; labels are ``-100`` on every prompt token.
* chat: rendered with the tokenizer's chat template; labels only on assistant turns (their
  content and closing tokens, not the role header).
* text: ``doc + eos``; with packing, documents are concatenated and cut into ``max_length`` pieces.

Samples longer than ``max_length`` are truncated or dropped; samples whose labels are all masked
are dropped. Both are counted in :class:`EncodeStats` and reported by the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leantune.data.formats import KINDS
from leantune.data.records import DataError

__all__ = [
    "IGNORE_INDEX",
    "EncodeStats",
    "PreferencePair",
    "Sample",
    "chat_prompt_ids",
    "encode_preference",
    "encode_records",
]


def _starts_with_bos(tokenizer: Any, text: str) -> bool:
    # Templates such as Llama 3's write the bos token themselves; the tokenizer must not add another.
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template with the generation
    prompt, tokenized exactly as the chat data of a run are (one bos token)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=not _starts_with_bos(tokenizer, text))["input_ids"])


IGNORE_INDEX = -100


@dataclass
class Sample:
    """One training sequence. ``prompt_ids``/``answer`` are set when it has a checkable answer;
    ``position_ids`` when it holds several samples (:mod:`leantune.data.packing`)."""

    input_ids: list[int]
    labels: list[int]
    task: str | None = None
    prompt_ids: list[int] | None = None
    answer: str | None = None
    position_ids: list[int] | None = None


@dataclass
class EncodeStats:
    records: int = 0
    samples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    label_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [
            f"{self.records} records -> {self.samples} sequences, {self.tokens} tokens "
            f"({self.label_tokens} trained)"
        ]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} dropped as longer than max_length")
        if self.dropped_no_labels:
            parts.append(f"{self.dropped_no_labels} dropped with every label masked")
        return "; ".join(parts)


class _Encoder:
    def __init__(self, tokenizer: Any, max_length: int, overlong: str) -> None:
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        self.tok = tokenizer
        self.max_length = max_length
        self.overlong = overlong
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; leantune needs one to end responses")
        self.eos = tokenizer.eos_token_id

    def ids(self, text: str, *, first: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=first)["input_ids"])

    def finish(
        self, ids: list[int], labels: list[int], stats: EncodeStats
    ) -> tuple[list[int], list[int]] | None:
        if len(ids) > self.max_length:
            if self.overlong == "drop":
                stats.dropped_overlong += 1
                return None
            stats.truncated += 1
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            # Labels are shifted inside the model: position 0 is never a target.
            stats.dropped_no_labels += 1
            return None
        return ids, labels

    def instruction(self, prompt: str, response: str) -> tuple[list[int], list[int], list[int]]:
        p = self.ids(prompt, first=True)
        r = self.ids(response, first=False) + [self.eos]
        return p + r, [IGNORE_INDEX] * len(p) + r, p

    def chat(
        self, messages: list[dict[str, Any]], loc: str, tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], list[int]]:
        extra = {"tools": tools} if tools else {}

        def render(msgs: list[dict[str, Any]], **kwargs: Any) -> str:
            try:
                return self.tok.apply_chat_template(msgs, **kwargs, **extra)
            except Exception as err:  # jinja's TemplateError, or raise_exception() in the template
                raise DataError(
                    f"{loc}: the tokenizer's chat template refuses this conversation: {err}"
                ) from None

        if getattr(self.tok, "chat_template", None) is None:
            raise DataError(f"{loc}: chat data needs a tokenizer with a chat template")
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                header = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
                if not header.startswith(done):
                    raise DataError(
                        f"{loc}: the chat template does not render conversations prefix by prefix"
                    )
                piece = header[len(done) :]
                # special tokens (the bos) once, before the first token: not per empty rendering
                first = not ids and not _starts_with_bos(self.tok, header)
                new = self.ids(piece, first=first) if piece else []
                ids += new
                labels += [IGNORE_INDEX] * len(new)
                done = header
            full = render(messages[: i + 1], tokenize=False)
            if not full.startswith(done):
                raise DataError(f"{loc}: the chat template does not render conversations prefix by prefix")
            new = self.ids(full[len(done) :], first=not ids and not _starts_with_bos(self.tok, full))
            ids += new
            labels += new if m["role"] == "assistant" else [IGNORE_INDEX] * len(new)
            done = full
        return ids, labels


def _source(where: list[str]) -> str:
    """The file the records came from, for an error about all of them (``where``: ``file:line``)."""
    return where[0].rsplit(":", 1)[0] if where else "data"


def _count_tokens(stats: EncodeStats, samples: list[Sample]) -> None:
    stats.tokens = sum(len(s.input_ids) for s in samples)
    # labels are shifted inside the model: position 0 is never a target
    stats.label_tokens = sum(sum(1 for x in s.labels[1:] if x != IGNORE_INDEX) for s in samples)


def encode_records(
    records: list[dict[str, Any]],
    where: list[str],
    fmt: str,
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str = "truncate",
    pack: bool = True,
) -> tuple[list[Sample], EncodeStats]:
    """Tokenize canonical ``records`` (:func:`leantune.data.formats.prepare_records`) of format
    ``fmt``: one of :data:`leantune.data.formats.FORMATS`, trained as its kind (text, instruction or
    chat).

    Returns:
        The samples and the statistics (truncated / dropped counts).

    Raises:
        DataError: nothing is left to train on (e.g. every label masked), naming the cause.
    """
    if fmt not in KINDS:
        raise DataError(f"unknown data format {fmt!r}")
    fmt = KINDS[fmt]
    if fmt == "preference":
        raise DataError(
            f"{where[0] if where else 'data'}: prompt/chosen/rejected records are preference data, for a "
            "preference objective; supervised fine-tuning needs text, instruction or chat records "
            "(data.columns={messages: chosen} trains on the chosen conversations when they hold the prompt)"
        )
    enc = _Encoder(tokenizer, max_length, overlong)
    stats = EncodeStats(records=len(records))
    samples: list[Sample] = []
    if fmt == "text" and pack:
        stream: list[int] = []
        for rec in records:
            stream += enc.ids(rec["text"], first=True) + [enc.eos]
        for start in range(0, len(stream) - max_length + 1, max_length):
            chunk = stream[start : start + max_length]
            samples.append(Sample(chunk, list(chunk)))
        stats.extra["packed_tokens_dropped"] = len(stream) - len(samples) * max_length
        if not samples:
            raise DataError(
                f"{where[0] if where else 'data'}: only {len(stream)} tokens in all, fewer than one "
                f"packed sequence of data.max_length={max_length}; add data or lower max_length"
            )
    else:
        for rec, loc in zip(records, where):
            prompt_ids = answer = None
            if fmt == "text":
                ids = enc.ids(rec["text"], first=True) + [enc.eos]
                labels = list(ids)
            elif fmt == "instruction":
                ids, labels, prompt_ids = enc.instruction(rec["prompt"], rec["response"])
                answer = rec["response"]
            else:
                ids, labels = enc.chat(rec["messages"], loc, rec.get("tools"))
            out = enc.finish(ids, labels, stats)
            if out is None:
                continue
            # (an instruction prompt of max_length tokens or more leaves no label: dropped above)
            samples.append(Sample(out[0], out[1], task=rec.get("task"), prompt_ids=prompt_ids, answer=answer))
    if not samples:
        causes = []
        if stats.dropped_no_labels:
            causes.append(f"{stats.dropped_no_labels} had every label masked (prompt fills max_length?)")
        if stats.dropped_overlong:
            causes.append(f"{stats.dropped_overlong} were longer than data.max_length={max_length}")
        source = _source(where)
        raise DataError(
            f"{source}: no usable samples out of {len(records)}: {'; '.join(causes) or 'no records'}. "
            "Raise data.max_length, use data.overlong=truncate, or check the data."
        )
    stats.samples = len(samples)
    _count_tokens(stats, samples)
    return samples, stats


@dataclass
class PreferencePair:
    """One prompt with its chosen and rejected completions, each a full sequence whose labels
    cover the completion only (the prompt masked), as a preference objective reads them."""

    chosen: Sample
    rejected: Sample


def encode_preference(
    records: list[dict[str, Any]],
    where: list[str],
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str = "truncate",
) -> tuple[list[PreferencePair], EncodeStats]:
    """Tokenize canonical ``preference`` records (``prompt``, ``chosen``, ``rejected`` as messages:
    :func:`leantune.data.formats.prepare_records`): each side is the prompt followed by its
    completion, with the loss on the completion. Records given as messages go through the
    tokenizer's chat template (the loss on the assistant turns); records of three plain strings
    (``plain``) are the prompt's text followed by the completion's and eos, as instruction records
    are encoded (TRL's "standard" format), so that a DPO stage sees the text its SFT stage saw.

    Dropped and counted in the statistics (``extra``): pairs with an empty chosen or rejected
    completion (``empty``), pairs whose chosen and rejected completions are the same tokens
    (``identical``: no preference to learn), and pairs where
    either side keeps no completion token after ``max_length`` (``no_completion``) or is longer
    than it with ``overlong="drop"``.

    Raises:
        DataError: no pair is left, naming the causes.
    """
    enc = _Encoder(tokenizer, max_length, overlong)
    stats = EncodeStats(records=len(records))
    counts = {"empty": 0, "identical": 0, "no_completion": 0, "overlong": 0}
    pairs: list[PreferencePair] = []

    def empty(messages: list[dict[str, Any]]) -> bool:
        replies = [m for m in messages if m["role"] == "assistant"]
        return all(not m.get("content") and not m.get("tool_calls") for m in replies)

    for rec, loc in zip(records, where):
        if empty(rec["chosen"]) or empty(rec["rejected"]):
            counts["empty"] += 1
            continue
        sides = []
        for name in ("chosen", "rejected"):
            if rec.get("plain"):  # strings: the text as instruction records have it
                ids, labels, _ = enc.instruction(rec["prompt"][0]["content"], rec[name][0]["content"])
            else:
                ids, labels = enc.chat(rec["prompt"] + rec[name], f"{loc} ({name})")
            overlong_before = stats.dropped_overlong
            out = enc.finish(ids, labels, stats)
            if out is None:
                counts["overlong" if stats.dropped_overlong > overlong_before else "no_completion"] += 1
                break
            sides.append(Sample(out[0], out[1], task=rec.get("task")))
        if len(sides) < 2:
            continue
        if sides[0].input_ids == sides[1].input_ids:
            counts["identical"] += 1
            continue
        pairs.append(PreferencePair(*sides))
    # the per-side counters of finish() are reported per pair in ``extra`` instead
    stats.dropped_overlong = stats.dropped_no_labels = 0
    stats.extra.update({f"dropped_{k}": v for k, v in counts.items()})
    if not pairs:
        causes = [f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v]
        raise DataError(
            f"{_source(where)}: no usable preference pairs out of {len(records)} "
            f"({', '.join(causes) or 'no records'}); raise data.max_length or check the data"
        )
    stats.samples = len(pairs)
    _count_tokens(stats, [s for p in pairs for s in (p.chosen, p.rejected)])
    return pairs, stats
