"""What a run optimises: an :class:`~.base.Objective` turns a batch into a loss and its metrics.

* :class:`~.base.SFTObjective`: next-token prediction (``train.objective=sft``, the default);
* :mod:`.preference`: the preference losses (DPO, IPO, SimPO, ORPO) on log-probs.
"""

from __future__ import annotations

from typing import Any

from leantune.objectives.base import Objective, SFTObjective
from leantune.objectives.preference import (
    LOSSES,
    NEEDS_REFERENCE,
    PreferenceOutput,
    completion_logps,
    preference_loss,
)

__all__ = [
    "LOSSES",
    "NEEDS_REFERENCE",
    "Objective",
    "PreferenceOutput",
    "SFTObjective",
    "build_objective",
    "completion_logps",
    "preference_loss",
]


def build_objective(trainer: Any) -> Objective:
    """The objective ``train.objective`` names, built on the trainer's model and loss."""
    name = trainer.cfg.train.objective
    if name == "sft":
        return SFTObjective(trainer.loss_fn)
    from leantune.objectives.dpo import PreferenceObjective

    return PreferenceObjective(trainer)
