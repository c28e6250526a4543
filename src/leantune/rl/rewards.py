"""The sequence reward of PPO: a Python function named in the config, or a reward model.

``rl.reward=module:function`` (or ``path/to/file.py:function``) names
``reward(prompts, completions) -> list[float]``; a function that also takes ``answers`` gets each
prompt's reference answer (``None`` where the data has none). ``rl.reward=DIR`` scores prompt +
completion with a sequence-classification model (``AutoModelForSequenceClassification``, one
label) at the last token. Whatever the source, a score that is not a finite number, a list of the
wrong length or an exception is a :class:`RewardError` naming the reward.

Built in: :func:`builtin_tasks` (the built-in tasks' answers recomputed from the prompt: the share
of correct characters, position by position) and :func:`exact_match` (against ``answers``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["RewardError", "RewardFunction", "RewardModel", "builtin_tasks", "exact_match", "load_reward"]


class RewardError(RuntimeError):
    """The reward could not be computed, or what it returned is not one finite number per completion."""


def positional_match(answer: str, completion: str) -> float:
    """The share of ``answer``'s characters matched at the same position, over the longer of the
    two (so extra characters cost as much as missing ones); 1.0 only for an exact match."""
    answer, completion = answer.strip(), completion.strip()
    if not answer and not completion:
        return 1.0
    hits = sum(a == c for a, c in zip(answer, completion))
    return hits / max(len(answer), len(completion))


_TASK = re.compile(r"^(?:add (\d+)\+(\d+)|reverse ([a-z]+)|sort (\d+)|([a-z]+): count ([a-z]))\s*$")


def _task_answer(prompt: str) -> str | None:
    from leantune.data.tasks import _lsd_first

    m = _TASK.match(prompt.strip())
    if m is None:
        return None
    a, b, word, digits, letters, letter = m.groups()
    if a is not None:
        return _lsd_first(int(a[::-1]) + int(b[::-1]), 4)
    if word is not None:
        return word[::-1]
    if digits is not None:
        return "".join(sorted(digits))
    return str(letters.count(letter))


def builtin_tasks(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The built-in tasks (:mod:`leantune.data.tasks`: add, reverse, sort, count): the answer is
    recomputed from the prompt and the reward is :func:`positional_match` (exact match: 1.0).

    Raises:
        ValueError: a prompt is not one of the built-in tasks'.
    """
    out = []
    for p, c in zip(prompts, completions):
        answer = _task_answer(p)
        if answer is None:
            raise ValueError(f"not a built-in task prompt: {p!r}")
        out.append(positional_match(answer, c))
    return out


def exact_match(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str | None]
) -> list[float]:
    """1.0 where the completion equals the reference answer (whitespace-stripped), else 0.0.

    Raises:
        ValueError: a prompt has no reference answer.
    """
    if any(a is None for a in answers):
        raise ValueError("exact_match needs a reference answer for every prompt (instruction data)")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]


def _load_function(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise RewardError(f"rl.reward={spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RewardError(f"rl.reward={spec!r}: {path} does not exist")
            loader = importlib.util.spec_from_file_location(f"leantune_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
            sys.modules[loader.name] = module  # type: ignore[union-attr]
            loader.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except RewardError:
        raise
    except Exception as err:  # the user's module failed to import: say which and why
        raise RewardError(
            f"rl.reward={spec!r}: importing {module_name} failed: {type(err).__name__}: {err}"
        ) from err
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise RewardError(f"rl.reward={spec!r}: {module_name} has no function {attr!r}")
    return fn


def _check(spec: str, scores: Any, n: int) -> list[float]:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().flatten().tolist()
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise RewardError(
            f"rl.reward={spec!r} returned {type(scores).__name__}, not a list of numbers: {err}"
        ) from None
    if len(values) != n:
        raise RewardError(f"rl.reward={spec!r} returned {len(values)} scores for {n} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(
            f"rl.reward={spec!r} returned a non-finite score ({values[bad[0]]}) for completion "
            f"{bad[0]} ({len(bad)} of {n} not finite)"
        )
    return values


class RewardFunction:
    """``rl.reward=module:function``: calls it and checks what it returns."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fn = _load_function(spec)
        params = inspect.signature(self.fn).parameters
        self.takes_answers = "answers" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.description = f"function {spec}"

    def __call__(
        self, prompts: list[str], completions: list[str], answers: list[str | None], **_: Any
    ) -> list[float]:
        kwargs = {"answers": answers} if self.takes_answers else {}
        try:
            scores = self.fn(prompts, completions, **kwargs)
        except Exception as err:
            raise RewardError(f"rl.reward={self.spec!r} raised {type(err).__name__}: {err}") from err
        return _check(self.spec, scores, len(completions))


class RewardModel:
    """``rl.reward=DIR``: a sequence-classification model scoring prompt + completion at its last
    token. Kept on the host between rollouts when ``offload`` (moved to ``device`` for its pass).

    The sequences are re-tokenized from text when the directory has its own tokenizer, else the
    policy's token ids are scored as they are (the two must then share a vocabulary).
    """

    def __init__(self, path: str, device: torch.device, *, offload: bool = False, dtype: Any = None) -> None:
        from transformers import AutoModelForSequenceClassification

        from leantune.models import check_model_dir

        self.spec = path
        check_model_dir(path, "rl.reward")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, use_safetensors=True
            )
        except Exception as err:
            raise RewardError(f"rl.reward={path!r} is not a sequence-classification model: {err}") from err
        self.model.requires_grad_(False).eval()
        self.device, self.offload = device, offload
        self.model.to("cpu" if offload else device)
        self.tokenizer = None
        if (Path(path) / "tokenizer_config.json").is_file():
            from leantune.data import load_tokenizer

            self.tokenizer = load_tokenizer(path)
        self.description = f"reward model {path}"

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None], *,
                 sequences: list[list[int]]) -> list[float]:  # fmt: skip
        from leantune.rl.values import last_token_values

        if self.tokenizer is not None:
            sequences = [list(self.tokenizer(p + c)["input_ids"]) for p, c in zip(prompts, completions)]
        if self.offload:
            self.model.to(self.device)
        try:
            scores = last_token_values(self.model, sequences, self.device)
        finally:
            if self.offload:
                self.model.to("cpu")
        return _check(self.spec, scores, len(completions))


def load_reward(spec: str, device: torch.device, *, offload: bool = False, dtype: Any = None) -> Any:
    """The reward named by ``rl.reward``."""
    if ":" not in spec or Path(spec).is_dir():
        return RewardModel(spec, device, offload=offload, dtype=dtype)
    return RewardFunction(spec)
