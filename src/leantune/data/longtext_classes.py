"""LongWanjuan's three classes of long text, by threshold rules on the quality metrics, and the
training mixture that follows from them.

* **chaotic** (garbled or meaningless text: coherence low, cohesion low, complexity at an extreme):
  a document whose value lies in *any* of the ``chaotic`` ranges;
* **holistic** (complete works: coherence and cohesion high, complexity medium): one, not chaotic,
  whose values lie in *all* of the ``holistic`` ranges;
* **aggregated** (related short pieces, lists, tables): the rest;
* **unscored** (not a LongWanjuan class): a metric that a rule reads is missing or NaN, e.g. the
  coherence of a document shorter than one window.

The mixture drops chaotic text and up-weights aggregated text relative to holistic (the paper's
recipe); :func:`mixture` turns per-class files and token counts into ``data.train`` /
``data.weights``.

Note:
    The paper's numeric thresholds, its AND/OR rule and its up-sampling ratio are not public: every
    default in :data:`DEFAULT_RULES` is ours, each with its reason beside it:

    * ``ppl_ratio``: a dead band of +-1% around 0. Above it the long context helps (holistic, with
      cohesion); below it the context hurts, InternLM2's rule for dropping a text (chaotic); inside
      it, the context does not matter measurably (aggregated pieces). The margin is there because a
      scorer's ``ppl_ratio`` on text whose context carries nothing is noise around 0 (within +-0.005
      for the scorer of ``benchmarks/longwanjuan.py``): ``<= 0`` alone would call half of that text
      chaotic.
    * ``word_ttr`` (words and punctuation marks): below 0.02 one word repeats; at 0.5 or more most
      "words" are new, which natural text long enough for a window does not do (this machine's
      package documentation, cut to 3,000 characters: at most 0.42) and random or shuffled
      characters do (0.6 to 1.0). The TTR falls with length: the bound is for documents of at least
      a few thousand characters, as LongWanjuan's (32 KB and more) are.
    * ``pronoun_rate`` and ``connective_rate``: cohesion, any real presence of references back and of
      linked sentences.

    The benchmark checks them on a second, held-out draw of its synthetic documents. They are meant
    to be tuned per domain and per scoring model on documents near the thresholds, as InternLM2 does.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CLASSES", "DEFAULT_RULES", "Range", "Rules", "load_rules", "mixture"]

CLASSES = ("holistic", "aggregated", "chaotic", "unscored")

# Ours (see the module's Note); the same text is what `leantune data classify --print-rules` shows.
DEFAULT_RULES = """\
# A document is chaotic when one value lies in one of the `chaotic` ranges; otherwise holistic when
# every value lies in its `holistic` range; otherwise aggregated. Ranges are inclusive; a metric may
# take a list of ranges. Every number here is leantune's, not the paper's (it publishes none).
chaotic:
  # The long context makes the end >= 1% less likely: InternLM2's rule (drop a text when the long
  # context hurts), with a margin: without one, a scorer's noise around 0 would make half of all
  # texts whose context neither helps nor hurts chaotic.
  ppl_ratio: {max: -0.01}
  # Complexity at an extreme: one word repeated, or strings that are not words (random letters,
  # shuffled characters). Natural text long enough for one window has a word TTR well under 0.5
  # (punctuation marks count as words); it falls with length, so raise 0.5 for documents of less
  # than ~2,000 characters.
  word_ttr: [{max: 0.02}, {min: 0.5}]
holistic:
  ppl_ratio: {min: 0.01}            # the long context lowers the window's perplexity by >= 1%
  pronoun_rate: {min: 0.01}         # pronouns refer back
  connective_rate: {min: 0.002}     # sentences are linked
# Sampling weight per class relative to its token share: chaotic dropped, aggregated up-weighted.
upsample: {holistic: 1.0, aggregated: 2.0, chaotic: 0.0, unscored: 1.0}
"""

_TOP = ("chaotic", "holistic", "upsample")


@dataclass(frozen=True)
class Range:
    """An inclusive range of one metric; ``None`` leaves that side open."""

    min: float | None = None
    max: float | None = None

    def __contains__(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclass
class Rules:
    """The classifier: ranges per metric for ``chaotic`` (any) and ``holistic`` (all), and the
    up-sampling weight of each class for the mixture."""

    chaotic: dict[str, list[Range]] = field(default_factory=dict)
    holistic: dict[str, list[Range]] = field(default_factory=dict)
    upsample: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        """Every metric a rule reads."""
        return sorted(set(self.chaotic) | set(self.holistic))

    def classify(self, scores: Mapping[str, Any]) -> str:
        """The class of one document's ``scores`` (a row of a scores file)."""
        values = {}
        for m in self.metrics:
            v = scores.get(m)
            if v is None or not isinstance(v, (int, float)) or math.isnan(v):
                return "unscored"
            values[m] = float(v)
        if any(values[m] in r for m, ranges in self.chaotic.items() for r in ranges):
            return "chaotic"
        if all(any(values[m] in r for r in ranges) for m, ranges in self.holistic.items()):
            return "holistic"
        return "aggregated"


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{where} must be a number, got {value!r}")
    return float(value)


def _ranges(where: str, spec: Any) -> list[Range]:
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for item in items:
        if not isinstance(item, dict) or not item:
            raise ValueError(
                f"{where}: a range is a mapping like {{min: 0.1}} or {{min: 0.1, max: 0.9}}, got {item!r}"
            )
        for key in item:
            if key not in ("min", "max"):
                raise ValueError(f"{where}: unknown bound {key!r}{_suggest(str(key), ['min', 'max'])}")
        lo = None if item.get("min") is None else _number(f"{where}.min", item["min"])
        hi = None if item.get("max") is None else _number(f"{where}.max", item["max"])
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{where}: min {lo} is above max {hi}")
        out.append(Range(lo, hi))
    return out


def load_rules(source: str | Path | Mapping[str, Any] | None = None, *, known: Sequence[str] = ()) -> Rules:
    """Rules from a YAML file, a mapping, or :data:`DEFAULT_RULES` when ``source`` is None.

    A file's ``chaotic`` / ``holistic`` sections replace the defaults' sections of the same name
    (those it leaves out keep the defaults); its ``upsample`` weights override the default weights
    of the classes it names.

    Args:
        known: metric names that exist (a scores file's columns); when given, a rule on any other
            metric is an error that suggests the closest name.

    Raises:
        ValueError: a misspelt section, metric, bound or class; a bound that is not a number; a
            range whose min is above its max; a negative weight.
        FileNotFoundError: the file does not exist.
    """
    import yaml

    spec = yaml.safe_load(DEFAULT_RULES)
    if source is not None:
        if isinstance(source, Mapping):
            user, name = dict(source), "rules"
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"thresholds file {str(path)!r} does not exist")
            try:
                user = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise ValueError(f"{path}: not a YAML file ({err})") from None
            name = str(path)
        if not isinstance(user, dict):
            raise ValueError(f"{name}: expected a mapping with {', '.join(_TOP)}, got {type(user).__name__}")
        for key in user:
            if key not in _TOP:
                raise ValueError(f"{name}: unknown section {key!r}{_suggest(str(key), _TOP)}")
        # Rule sections replace the defaults'; upsample weights are merged, so that giving one
        # class's weight does not bring the dropped chaotic text back.
        spec.update({k: v for k, v in user.items() if k != "upsample"})
        if isinstance(user.get("upsample"), dict):
            spec["upsample"] = {**spec["upsample"], **user["upsample"]}
        elif "upsample" in user:
            spec["upsample"] = user["upsample"]
    rules = Rules()
    for section in ("chaotic", "holistic"):
        body = spec.get(section) or {}
        if not isinstance(body, dict):
            raise ValueError(f"{section}: expected a mapping of metric -> range, got {body!r}")
        for metric, ranges in body.items():
            if known and metric not in known:
                raise ValueError(f"{section}.{metric}: no such metric{_suggest(str(metric), sorted(known))}")
            getattr(rules, section)[metric] = _ranges(f"{section}.{metric}", ranges)
    weights = spec.get("upsample") or {}
    if not isinstance(weights, dict):
        raise ValueError(f"upsample: expected a mapping of class -> weight, got {weights!r}")
    for cls, w in weights.items():
        if cls not in CLASSES:
            raise ValueError(f"upsample.{cls}: no such class{_suggest(str(cls), CLASSES)}")
        w = _number(f"upsample.{cls}", w)
        if w < 0:
            raise ValueError(f"upsample.{cls} must be >= 0, got {w}")
        rules.upsample[cls] = w
    for cls in CLASSES:
        rules.upsample.setdefault(cls, 1.0)
    return rules


def mixture(
    files: Mapping[str, str], tokens: Mapping[str, float], upsample: Mapping[str, float]
) -> dict[str, list[Any]]:
    """``data.train`` and ``data.weights`` for per-class files.

    Text samples are packed into sequences of ``data.max_length`` tokens, so a source's share of
    the samples is its share of the tokens; its weight is that share times its class's
    ``upsample``, normalised (a weight of 0 drops the class, as for chaotic text).

    Args:
        files: class -> the file that holds its documents.
        tokens: class -> the tokens of its documents.
        upsample: class -> weight.

    Raises:
        ValueError: no class with tokens and a positive weight is left.
    """
    raw = {c: float(tokens.get(c, 0)) * upsample.get(c, 1.0) for c in files}
    kept = [c for c in CLASSES if c in files and raw[c] > 0]
    total = sum(raw[c] for c in kept)
    if not kept:
        raise ValueError("no documents are left in the mixture (every class is empty or has weight 0)")
    return {"train": [files[c] for c in kept], "weights": [round(raw[c] / total, 6) for c in kept]}
