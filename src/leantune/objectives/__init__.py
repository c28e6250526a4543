"""Training objectives beyond next-token prediction: the preference losses (:mod:`.preference`)."""

from leantune.objectives.preference import (
    LOSSES,
    NEEDS_REFERENCE,
    PreferenceOutput,
    completion_logps,
    preference_loss,
)

__all__ = ["LOSSES", "NEEDS_REFERENCE", "PreferenceOutput", "completion_logps", "preference_loss"]
