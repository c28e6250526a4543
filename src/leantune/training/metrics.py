"""The loop's measurements: training time without the pauses for evaluation and checkpoints
(:class:`Clock`), and the averages of the steps between two log lines (:class:`MetricWindow`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from leantune.training.guards import StepResult

__all__ = ["Clock", "MetricWindow"]


class Clock:
    """Seconds of training: wall time since the start minus the time spent in :meth:`paused`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused_s = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused_s

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation and saving are not training throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0


class MetricWindow:
    """The step results since the last log line, averaged into one ``train`` record."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.results: list[StepResult] = []
        self.t0 = clock.now()

    def observe(self, result: StepResult) -> None:
        self.results.append(result)

    def flush(self, world_size: int) -> dict[str, Any]:
        """The window's averages (finite losses only; tokens per second of training time), then
        start a new window. The caller adds what is not per step (lr, memory, epoch)."""
        elapsed = max(self.clock.now() - self.t0, 1e-9)
        window, self.results, self.t0 = self.results, [], self.clock.now()
        toks = sum(r.tokens for r in window)
        finite = [r.loss for r in window if math.isfinite(r.loss)]
        norms = [r.grad_norm for r in window if r.grad_norm is not None]
        values: dict[str, Any] = {
            "loss": sum(finite) / len(finite) if finite else float("nan"),
            "tokens_per_s": toks / elapsed,
            "tokens_per_s_per_device": toks / elapsed / world_size,
        }
        if norms:
            values["grad_norm"] = sum(norms) / len(norms)
        names = {k for r in window if r.metrics for k in r.metrics}
        for name in sorted(names):
            xs = [
                r.metrics[name] for r in window if r.metrics and math.isfinite(r.metrics.get(name, math.nan))
            ]
            if xs:
                values[name] = sum(xs) / len(xs)
        return values
