"""The parts of a training run that the loop (:class:`leantune.trainer.Trainer`) composes.

========================  ==========================================================================
:mod:`.build`             the model, optimizer, schedule and batch stream a config describes
:mod:`.run_dir`           where a run lives, what it resumes from, the command that resumes it
:mod:`.model_io`          how a model's weights are saved and loaded (HF, peft adapter, HFT mask)
:mod:`.checkpointer`      resumable checkpoints: when to save, what is in one, how it is restored
:mod:`.guards`            non-finite steps and stop signals
:mod:`.report`            what the run prints at its start and end
========================  ==========================================================================
"""
