"""Built-in instruction tasks with checkable answers, generated deterministically from a seed.

Each example is ``{"prompt", "response", "task"}``; the response is the exact answer, so a model's
greedy continuation can be scored by exact match. Evaluation examples are drawn first and excluded
from the training set, so accuracy measures generalisation rather than recall.

Families:
    add      ``"add 740+503\\n"`` -> ``"2530"``   (47 + 305 = 352: operands of 1-3 digits, every
             number written least-significant digit first and zero-padded to 3 digits, the sum to 4)
    reverse  ``"reverse kqzb\\n"`` -> ``"bzqk"``   (3-6 letters)
    sort     ``"sort 5391\\n"`` -> ``"1359"``      (4-7 digits)
    count    ``"abaca: count a\\n"`` -> ``"3"``    (5-9 letters from a small alphabet)

Opt-in (named in ``data.tasks``, never part of the default mix, see :data:`OPT_IN_TASKS`):
    recall   multi-query associative recall, a long-context task: ``"...qwK7ertyB3uiopQ1asdf\\nQK="``
             -> ``"17"`` (key-digit pairs scattered in filler, the keys queried at the end, the
             answers in query order; :func:`make_recall`)
    copy     ``"copy q7Rz0kLm\\n"`` -> ``"q7Rz0kLm"`` (8-30 letters and digits; its exact match needs
             ``eval.max_new_tokens`` >= 31): the training partner of ``recall``
             (``data.tasks=[recall,copy]``). Every answer token is found by looking back at the same
             offset, a dense signal that forms the induction heads recall needs; trained on
             ``recall`` alone the tiny model stays on a plateau where it picks among the values in
             the prompt (docs/kv-cache.md)
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "OPT_IN_TASKS",
    "RECALL_LENGTH",
    "RECALL_PAIRS",
    "RECALL_QUERIES",
    "RecallItem",
    "TASKS",
    "TASK_WEIGHTS",
    "generate_examples",
    "make_example",
    "make_recall",
    "task_weights",
]


def _lsd_first(value: int, width: int) -> str:
    return str(value).zfill(width)[::-1]


def _add(rng: random.Random) -> tuple[str, str]:
    # Digits least-significant first and zero-padded, so that every answer digit sits at a fixed
    # distance from the two digits it sums and the carry comes from the digit just written: the
    # tiny model learns this in the default job, the plain rendering not at all (docs/default-job.md).
    a = rng.randint(0, 10 ** rng.randint(1, 3) - 1)
    b = rng.randint(0, 10 ** rng.randint(1, 3) - 1)
    return f"add {_lsd_first(a, 3)}+{_lsd_first(b, 3)}\n", _lsd_first(a + b, 4)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"reverse {word}\n", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 7)))
    return f"sort {digits}\n", "".join(sorted(digits))


def _count(rng: random.Random) -> tuple[str, str]:
    # The letter last, right before the answer, where the model finds it at once; with the letter
    # first (a word's length and more before the answer) it did not learn to count at all.
    alphabet = "abcde"
    word = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 9)))
    letter = rng.choice(alphabet)
    return f"{word}: count {letter}\n", str(word.count(letter))


RECALL_LENGTH = 64
"""Characters of a built-in ``recall`` prompt (its token count under the byte-level tokenizer,
bos not counted): the training length of a model trained on it."""
RECALL_PAIRS = 4
"""Key-value pairs in a built-in ``recall`` prompt."""
RECALL_QUERIES = 2
"""Keys queried at the end of a built-in ``recall`` prompt (distinct, in a random order)."""
_RECALL_KEYS = string.ascii_uppercase  # distinct from the filler (lowercase) and the values (digits)


@dataclass(frozen=True)
class RecallItem:
    """One multi-query associative recall prompt (see :func:`make_recall`)."""

    prompt: str
    """Filler with the pairs, a newline, the queried keys and ``=``."""
    response: str
    """The queried keys' values, in query order."""
    keys: tuple[str, ...]
    """The pairs' keys, in the order they appear."""
    values: tuple[str, ...]
    """The pairs' values (``values[i]`` belongs to ``keys[i]``)."""
    positions: tuple[int, ...]
    """Character offset of each pair's key in :attr:`prompt` (increasing)."""
    queries: tuple[int, ...]
    """Indices into :attr:`keys` of the queried pairs, in query order."""


def make_recall(
    rng: random.Random,
    length: int = RECALL_LENGTH,
    pairs: int = RECALL_PAIRS,
    queries: int = RECALL_QUERIES,
) -> RecallItem:
    """A multi-query associative recall prompt of exactly ``length`` characters.

    ``pairs`` key-value pairs (a distinct uppercase key followed by a digit) sit at uniformly drawn,
    non-overlapping places in random lowercase filler; then a newline, ``queries`` distinct keys in
    a random order and ``=``. The answer is the queried keys' values in query order. Finding a value
    is an induction step (find the earlier occurrence of the key, read the token after it) that
    only attention to the right place solves, which is what KV-cache eviction can break.

    Raises:
        ValueError: a count out of range, or ``length`` too short for the pairs and the queries.
    """
    for name, value, low in (("pairs", pairs, 1), ("queries", queries, 1), ("length", length, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"recall {name} must be an int >= {low}, got {value!r}")
    if pairs > len(_RECALL_KEYS):
        raise ValueError(f"recall pairs must be at most {len(_RECALL_KEYS)} (distinct keys), got {pairs}")
    if queries > pairs:
        raise ValueError(f"recall queries ({queries}) must not exceed pairs ({pairs})")
    body = length - queries - 2  # the newline, the queried keys, "="
    if body < 2 * pairs:
        raise ValueError(
            f"a recall prompt of {length} characters cannot hold {pairs} pairs and {queries} queries "
            f"(at least {2 * pairs + queries + 2})"
        )
    keys = tuple(rng.sample(_RECALL_KEYS, pairs))
    values = tuple(rng.choice(string.digits) for _ in range(pairs))
    # Uniform non-overlapping placement: choose the pairs' ranks among body - pairs slots, then
    # shift the i-th by i (each pair takes two characters).
    starts = [s + i for i, s in enumerate(sorted(rng.sample(range(body - pairs), pairs)))]
    text = [rng.choice(string.ascii_lowercase) for _ in range(body)]
    for start, key, value in zip(starts, keys, values):
        text[start], text[start + 1] = key, value
    asked = tuple(rng.sample(range(pairs), queries))
    prompt = "".join(text) + "\n" + "".join(keys[i] for i in asked) + "="
    response = "".join(values[i] for i in asked)
    return RecallItem(prompt, response, keys, values, tuple(starts), asked)


def _recall(rng: random.Random) -> tuple[str, str]:
    item = make_recall(rng)
    return item.prompt, item.response


_COPY_ALPHABET = string.ascii_letters + string.digits


def _copy(rng: random.Random) -> tuple[str, str]:
    text = "".join(rng.choice(_COPY_ALPHABET) for _ in range(rng.randint(8, 30)))
    return f"copy {text}\n", text


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
}

# How often each family is drawn into a training set by default. Add needs the most samples: with
# the four balanced it was the last to reach 90% in the default job, and with reverse at 1/8 reverse
# fell short instead (docs/default-job.md).
TASK_WEIGHTS: dict[str, float] = {"add": 3.0, "reverse": 2.0, "sort": 2.0, "count": 2.0}

# Families generated only when named in data.tasks: not in TASKS or TASK_WEIGHTS, so the default
# job's mix (and its golden loss curve) and everything that loops over the default families stay
# as they are. Their default weight in a mix is 1.
OPT_IN_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"recall": _recall, "copy": _copy}


def _generator(task: str) -> Callable[[random.Random], tuple[str, str]]:
    found = TASKS.get(task) or OPT_IN_TASKS.get(task)
    if found is None:
        known = ", ".join([*TASKS, *OPT_IN_TASKS])
        raise ValueError(f"Unknown built-in task {task!r}: choose from {known}")
    return found


def _check_tasks(tasks: list[str]) -> None:
    if not tasks:
        raise ValueError("data.tasks is empty: name at least one built-in task")
    for task in tasks:
        _generator(task)


def task_weights(tasks: list[str], weights: list[float] | None = None) -> list[float]:
    """The training-set weights of ``tasks``: ``weights`` checked, or :data:`TASK_WEIGHTS` (1 for an
    opt-in family)."""
    _check_tasks(tasks)
    if weights is not None:
        return _checked_weights(tasks, weights)
    return [TASK_WEIGHTS.get(t, 1.0) for t in tasks]


def _checked_weights(tasks: list[str], weights: list[float]) -> list[float]:
    if len(weights) != len(tasks):
        raise ValueError(f"data.task_weights has {len(weights)} entries for {len(tasks)} data.tasks")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.task_weights must be finite, >= 0, with a positive sum, got {weights}")
    return [float(w) for w in weights]


def make_example(task: str, rng: random.Random) -> dict[str, str]:
    """One example of ``task`` drawn with ``rng``."""
    prompt, response = _generator(task)(rng)
    return {"prompt": prompt, "response": response, "task": task}


def generate_examples(
    tasks: list[str],
    n: int,
    seed: int,
    *,
    weights: list[float] | None = None,
    exclude: set[str] | None = None,
    unique: bool = False,
) -> list[dict[str, str]]:
    """``n`` examples of ``tasks``, deterministic for a given ``seed``.

    The families follow each other in a fixed interleaving (smooth weighted round-robin): after
    any ``k`` examples family ``i`` has ``k * w_i / sum(w)`` of them, give or take one.

    Args:
        tasks: task family names (see :data:`TASKS` and :data:`OPT_IN_TASKS`).
        n: number of examples.
        seed: generator seed.
        weights: relative share of each family; default: balanced (as evaluation sets are).
        exclude: prompts never to produce (e.g. the evaluation prompts).
        unique: no prompt appears twice (used for evaluation sets).
    """
    _check_tasks(tasks)
    shares = [1.0] * len(tasks) if weights is None else _checked_weights(tasks, weights)
    total = sum(shares)
    credit = [0.0] * len(tasks)
    rng = random.Random(seed)
    banned = set(exclude or ())
    out: list[dict[str, str]] = []
    attempts = 0
    pick: int | None = None  # the family of the next example; a banned prompt is redrawn from it
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct examples from tasks {tasks}: the space is too small")
        if pick is None:
            credit = [c + share for c, share in zip(credit, shares)]
            pick = max(range(len(tasks)), key=credit.__getitem__)
            credit[pick] -= total
        ex = make_example(tasks[pick], rng)
        if ex["prompt"] in banned:
            continue
        pick = None
        if unique:
            banned.add(ex["prompt"])
        out.append(ex)
    return out
