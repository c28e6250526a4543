"""Low-memory optimizers fused into the backward pass, and the factory for all optimizers.

* :class:`LOMO`, :class:`AdaLomo` — update each parameter inside ``backward()`` and free its
  gradient at once; use ``opt.backward(loss)``.
* :class:`InBackward` — the same engine for any per-parameter ``torch.optim`` optimizer.
* :class:`Stepper` — the same ``.backward(loss)`` API for ordinary optimizers.
* :func:`build_optimizer` — every optimizer by name, including the competitors built by their
  own packages (:mod:`leantune.optim.competitors`: GaLore, APOLLO, Adam-mini, BAdam, torchao's
  8-bit and 4-bit AdamW).
"""

from leantune.optim.adalomo import AdaLomo, adalomo_update
from leantune.optim.engine import BackwardResult, FusedOptimizer, GradientView
from leantune.optim.factory import (
    build_optimizer,
    is_competitor,
    is_elementwise,
    is_fused,
    needs_create_graph,
    optimizer_names,
    resume_refusal,
)
from leantune.optim.in_backward import InBackward
from leantune.optim.lomo import LOMO, lomo_update
from leantune.optim.precision import LossScaler, WriteBack, stochastic_round
from leantune.optim.segments import Segment
from leantune.optim.stepper import Stepper, as_stepper

__all__ = [
    "AdaLomo",
    "BackwardResult",
    "FusedOptimizer",
    "GradientView",
    "InBackward",
    "LOMO",
    "Segment",
    "LossScaler",
    "Stepper",
    "WriteBack",
    "adalomo_update",
    "as_stepper",
    "build_optimizer",
    "is_competitor",
    "is_elementwise",
    "is_fused",
    "lomo_update",
    "needs_create_graph",
    "optimizer_names",
    "resume_refusal",
    "stochastic_round",
]
