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
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable

__all__ = ["TASKS", "TASK_WEIGHTS", "generate_examples", "make_example", "task_weights"]


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


def _check_tasks(tasks: list[str]) -> None:
    if not tasks:
        raise ValueError("data.tasks is empty: name at least one built-in task")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"Unknown built-in task {task!r}: choose from {', '.join(TASKS)}")


def task_weights(tasks: list[str], weights: list[float] | None = None) -> list[float]:
    """The training-set weights of ``tasks``: ``weights`` checked, or :data:`TASK_WEIGHTS`."""
    _check_tasks(tasks)
    return [TASK_WEIGHTS[t] for t in tasks] if weights is None else _checked_weights(tasks, weights)


def _checked_weights(tasks: list[str], weights: list[float]) -> list[float]:
    if len(weights) != len(tasks):
        raise ValueError(f"data.task_weights has {len(weights)} entries for {len(tasks)} data.tasks")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.task_weights must be finite, >= 0, with a positive sum, got {weights}")
    return [float(w) for w in weights]


def make_example(task: str, rng: random.Random) -> dict[str, str]:
    """One example of ``task`` drawn with ``rng``."""
    if task not in TASKS:
        raise ValueError(f"Unknown built-in task {task!r}: choose from {', '.join(TASKS)}")
    prompt, response = TASKS[task](rng)
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
        tasks: task family names (see :data:`TASKS`).
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
