"""What stops a run: too many non-finite steps in a row (:class:`NonfiniteGuard`) and SIGINT /
SIGTERM (:class:`StopRequest`), both agreed on by every rank."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from leantune.distributed.runtime import all_agree, all_reduce_sum

__all__ = ["NonfiniteGuard", "StepResult", "StopRequest", "nonfinite_weights", "some"]


@dataclass
class StepResult:
    """What one optimizer step did (:meth:`leantune.trainer.Trainer.train_step`)."""

    loss: float
    """Mean loss over the micro-batches and ranks (NaN when a micro-batch's was not finite)."""
    tokens: int
    """Tokens of every rank's micro-batches."""
    skipped: bool
    """No update was applied (a non-finite loss or gradient)."""
    zeroed: bool = False
    """Some tensors had a non-finite gradient and got a zero one; the rest updated."""
    grad_norm: float | None = None
    """The global gradient norm, where the optimizer measured it (clipping)."""
    metrics: dict[str, float] | None = None
    """The objective's own metrics (e.g. DPO's rewards), averaged like the loss."""


def some(names: list[str], k: int = 3) -> str:
    """The first ``k`` of ``names``, with an ellipsis when there are more."""
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def nonfinite_weights(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters holding an inf/nan (every rank calls this; one host sync)."""
    named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()]
    flags = torch.stack([(~torch.isfinite(t.detach())).any().to(device) for _, t in named])
    flags = all_reduce_sum(flags.float()).tolist()
    return [n for (n, _), f in zip(named, flags) if f > 0]


class NonfiniteGuard:
    """Counts steps with a non-finite loss or gradient, warns about each, and stops the run after
    ``max_in_a_row`` consecutive ones with a diagnosis and the command that resumes it.

    Args:
        max_in_a_row: ``train.max_nonfinite``.
        lr: ``optim.lr``, named in the diagnosis.
        say: prints a line (the monitor's).
        bad_weights: the names of non-finite weights (a collective: every rank calls it together).
        hint: the arguments of ``leantune train`` that resume the run.
    """

    def __init__(self, max_in_a_row: int, lr: float, say: Callable[[str], None],
                 bad_weights: Callable[[], list[str]], hint: Callable[[], str]) -> None:  # fmt: skip
        self.max_in_a_row, self.lr = max_in_a_row, lr
        self.say, self.bad_weights, self.hint = say, bad_weights, hint
        self.in_a_row = 0
        self.total = 0

    def observe(self, step: int, result: StepResult) -> None:
        """Count ``result`` of ``step``.

        Raises:
            leantune.trainer.TrainingError: the ``max_in_a_row``-th non-finite step in a row.
        """
        from leantune.trainer import TrainingError

        if not (result.skipped or result.zeroed):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        what = (
            f"skipped: non-finite {'loss' if not math.isfinite(result.loss) else 'gradient'}"
            if result.skipped
            else "had a non-finite gradient in some tensors: they got a zero gradient, the rest updated"
        )
        self.say(f"warning: step {step} {what} ({self.in_a_row} in a row, {self.total} in all)")
        if self.in_a_row < self.max_in_a_row:
            return
        bad = self.bad_weights()
        state = (
            f"The weights are no longer finite ({some(bad)}): "
            "an update overflowed before these steps; nothing non-finite was saved."
            if bad
            else "No inf/nan reached the weights (skipped steps changed nothing; tensors with a "
            "non-finite gradient got a zero one)."
        )
        raise TrainingError(
            f"{self.in_a_row} consecutive steps had a non-finite loss or gradient "
            f"(last at step {step}, train.max_nonfinite={self.max_in_a_row}). "
            f"{state} Likely causes: learning rate too high (optim.lr={self.lr}), fp16 "
            "overflow, or bad data. Resume from the last checkpoint with gradient clipping (it may "
            f"change on resume):\n  leantune train {self.hint()} optim.clip_grad_norm=1.0\n"
            "or start a new run with a lower optim.lr (or model.dtype=bf16 instead of fp16)."
        )

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_total": self.total, "nonfinite_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state.get("nonfinite_total", 0))
        self.in_a_row = int(state.get("nonfinite_in_a_row", 0))


class StopRequest:
    """SIGINT and SIGTERM, while installed (a ``with`` block), ask the loop to stop at the end of the
    current step; a second signal stops at once (``KeyboardInterrupt``). :meth:`request` does the
    same from code (e.g. a hook)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.signum = signum

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def requested(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it every step)."""
        return all_agree(self.signum is not None, device)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name
