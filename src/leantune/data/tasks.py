"""Built-in instruction tasks with checkable answers, generated deterministically from a seed.

Each example is ``{"prompt", "response", "task"}``; the response is the exact answer, so a model's
greedy continuation can be scored by exact match. Evaluation examples are drawn first and excluded
from the training set, so accuracy measures generalisation rather than recall.

Families:
    add      ``"add 47+305\\n"`` -> ``"352"``      (operands of 1-3 digits)
    reverse  ``"reverse kqzb\\n"`` -> ``"bzqk"``   (3-6 letters)
    sort     ``"sort 5391\\n"`` -> ``"1359"``      (4-7 digits)
    count    ``"count a in abaca\\n"`` -> ``"3"``  (5-9 letters from a small alphabet)
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

__all__ = ["TASKS", "generate_examples", "make_example"]


def _add(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 10 ** rng.randint(1, 3) - 1)
    b = rng.randint(0, 10 ** rng.randint(1, 3) - 1)
    return f"add {a}+{b}\n", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"reverse {word}\n", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 7)))
    return f"sort {digits}\n", "".join(sorted(digits))


def _count(rng: random.Random) -> tuple[str, str]:
    alphabet = "abcde"
    word = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 9)))
    letter = rng.choice(alphabet)
    return f"count {letter} in {word}\n", str(word.count(letter))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
}


def make_example(task: str, rng: random.Random) -> dict[str, str]:
    """One example of ``task`` drawn with ``rng``."""
    if task not in TASKS:
        raise ValueError(f"Unknown built-in task {task!r}: choose from {', '.join(TASKS)}")
    prompt, response = TASKS[task](rng)
    return {"prompt": prompt, "response": response, "task": task}


def generate_examples(
    tasks: list[str], n: int, seed: int, *, exclude: set[str] | None = None, unique: bool = False
) -> list[dict[str, str]]:
    """``n`` examples cycling over ``tasks`` (balanced), deterministic for a given ``seed``.

    Args:
        tasks: task family names (see :data:`TASKS`).
        n: number of examples.
        seed: generator seed.
        exclude: prompts never to produce (e.g. the evaluation prompts).
        unique: no prompt appears twice (used for evaluation sets).
    """
    if not tasks:
        raise ValueError("data.tasks is empty: name at least one built-in task")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"Unknown built-in task {task!r}: choose from {', '.join(TASKS)}")
    rng = random.Random(seed)
    banned = set(exclude or ())
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct examples from tasks {tasks}: the space is too small")
        ex = make_example(tasks[len(out) % len(tasks)], rng)
        if ex["prompt"] in banned:
            continue
        if unique:
            banned.add(ex["prompt"])
        out.append(ex)
    return out
