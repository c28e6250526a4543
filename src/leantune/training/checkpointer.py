"""Resumable checkpoints of a run: when to write one, what is in it, how it is restored.

A checkpoint is ``RUN_DIR/checkpoints/step-NNNNNN/`` (written atomically and verified, see
:mod:`leantune.checkpoint`)::

    model/               the weights (HF format; the adapter for peft runs; the HFT mask)
    optim/               the optimizer state, keyed by parameter name
    training_state.pt    the scheduler, the data position, every rank's random and engine state,
                         the counters of :class:`TrainState` and the non-finite guard
    trainer_state.json   step, tokens seen and the last evaluation, for people
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from leantune import checkpoint as ckpt
from leantune.config import Config, ConfigError
from leantune.data import MixtureStream
from leantune.data.streaming import StreamingStream
from leantune.distributed.runtime import run_on_main
from leantune.optim import resume_refusal
from leantune.training.guards import NonfiniteGuard, some
from leantune.training.model_io import HfModelIO
from leantune.training.run_dir import check_resume_config

__all__ = ["Checkpointer", "TrainState"]


@dataclass
class TrainState:
    """The loop's own counters (the rest of a run's state lives in its components)."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Tokens trained on, over all ranks."""
    last_eval: dict[str, Any] = field(default_factory=dict)
    """The last evaluation's values."""


def _gather(obj: Any, world_size: int) -> list[Any]:
    from leantune.distributed.runtime import is_distributed

    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Writes and restores a run's checkpoints and its final model (every rank calls every method;
    rank 0 writes what is shared).

    Args:
        cfg: the run's config.
        run_dir: the run directory.
        env: the :class:`leantune.distributed.runtime.DistEnv`.
        model: the model (for FSDP the sharded one: saving gathers it).
        model_io: how the model is written and read.
        optimizer, stepper, scheduler, stream: the components whose state a checkpoint holds.
        guard: the non-finite guard, whose counters a checkpoint holds.
        bad_weights: the names of non-finite weights (a collective).
        hint: the arguments of ``leantune train`` that resume the run.
    """

    def __init__(self, cfg: Config, run_dir: Path, env: Any, model: torch.nn.Module, model_io: HfModelIO,
                 optimizer: Any, stepper: Any, scheduler: Any, stream: Any, guard: NonfiniteGuard,
                 bad_weights: Callable[[], list[str]], hint: Callable[[], str]) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.env, self.model, self.model_io = cfg, run_dir, env, model, model_io
        self.optimizer, self.stepper, self.scheduler, self.stream = optimizer, stepper, scheduler, stream
        self.guard, self.bad_weights, self.hint = guard, bad_weights, hint

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.env.dp_size * self.cfg.train.accumulation_steps

    def due(self, step: int, total_steps: int) -> bool:
        """Whether ``train.save_every`` asks for a checkpoint after ``step`` (the last step's is
        written by the end of the run)."""
        every = self.cfg.train.save_every
        return bool(every) and step % every == 0 and step < total_steps

    # ------------------------------------------------------------------ write
    def save(self, state: TrainState) -> Path:
        """Write a resumable checkpoint of ``state.step`` and prune old ones."""
        from leantune.trainer import TrainingError

        root = self.run_dir / "checkpoints"
        mine = {"rng": ckpt.capture_rng(), "engine": self.stepper.engine_state_dict()}
        if isinstance(self.stream, (MixtureStream, StreamingStream)):
            mine["data"] = self.stream.state_dict()  # each rank's own position
        per_rank = _gather(mine, self.env.world_size)

        def write(tmp: Path) -> None:
            self.model_io.save(tmp / "model")
            ckpt.save_optimizer(self.model, self.optimizer, tmp / "optim")
            if not self.env.is_main:
                return
            ckpt.save_torch(
                {
                    "scheduler": self.scheduler.state_dict(),
                    "data": self.stream.state_dict(),
                    "per_rank": per_rank,
                    "step": state.step,
                    "tokens_seen": state.tokens_seen,
                    **self.guard.state_dict(),
                    "world_size": self.env.dp_size,  # the data-parallel ranks the cursor counts for
                    "batch_size": self.cfg.train.batch_size,
                    "global_batch": self.global_batch,
                },
                tmp / "training_state.pt",
            )
            (tmp / "trainer_state.json").write_text(
                yaml.safe_dump(
                    {"step": state.step, "tokens_seen": state.tokens_seen, "eval": state.last_eval}
                )
            )

        self.refuse_nonfinite_weights("checkpoint", state.step)
        try:
            path = ckpt.atomic_directory(
                root / f"{ckpt.PREFIX}{state.step:06d}", write, meta={"step": state.step}
            )
        except ckpt.CheckpointWriteError as err:
            raise TrainingError(self._write_failed(err)) from err
        if self.env.is_main:
            ckpt.prune_checkpoints(root, self.cfg.train.keep_last)
        return path

    def export(self, state: TrainState) -> Path:
        """Write the final model (HF format: safetensors + config + tokenizer; for peft runs the
        adapter in peft format) to RUN_DIR/final."""
        from leantune.trainer import TrainingError

        self.refuse_nonfinite_weights("final model", state.step)
        try:
            return ckpt.atomic_directory(
                self.run_dir / "final", self.model_io.save, meta={"step": state.step}
            )
        except ckpt.CheckpointWriteError as err:
            raise TrainingError(self._write_failed(err)) from err

    def refuse_nonfinite_weights(self, what: str, step: int) -> None:
        """Weights with an inf/nan are never written."""
        from leantune.trainer import TrainingError

        bad = self.bad_weights()
        if bad:
            raise TrainingError(
                f"refusing to write the {what} of step {step}: the weights hold inf/nan "
                f"({some(bad)}): an update overflowed "
                f"(optim.lr={self.cfg.optim.lr} too high, or fp16 overflow). Earlier checkpoints are "
                "intact. Resume from the last one with gradient clipping:\n"
                f"  leantune train {self.hint()} optim.clip_grad_norm=1.0\n"
                "or start a new run with a lower optim.lr."
            )

    def _write_failed(self, err: ckpt.CheckpointWriteError) -> str:
        """What a failed save means for the run, and how to go on (local: no collectives)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a skipped newer checkpoint would be reported twice
            previous = ckpt.latest_valid_checkpoint(self.run_dir / "checkpoints")
        kept = (
            f"The newest intact checkpoint is {previous} (verified): nothing up to its step is lost."
            if previous is not None
            else "There is no earlier checkpoint: a new run would start over."
        )
        fix = "Free some disk space" if err.disk_full else "Fix the storage problem"
        return f"{err}.\n{kept}\n{fix}, then resume with:\n  leantune train {self.hint()}"

    # ------------------------------------------------------------------- read
    def load(self, path: Path, state: TrainState) -> str | None:
        """Restore every component and ``state`` from the checkpoint ``path``; returns a warning to
        show, if any.

        Raises:
            ConfigError: the run cannot continue the same optimization from it (a changed setting,
                an optimizer that cannot resume, another global batch, a mixture on other ranks).
        """
        cfg, rank, world_size = self.cfg, self.env.rank, self.env.world_size
        run_on_main(lambda: check_resume_config(cfg, self.run_dir))
        refusal = resume_refusal(cfg.optim.name)
        if refusal is not None:
            raise ConfigError(
                f"cannot resume {path} with optim.name={cfg.optim.name}: {refusal}, so the run "
                "would not continue the same optimization. Start a new run (train.resume unset, or a "
                "new train.run_name), from the saved weights with model.path=<checkpoint>/model if wanted"
            )
        self.model_io.load(path / "model", self.optimizer)
        ckpt.load_optimizer(self.model, self.optimizer, path / "optim")
        saved = ckpt.load_torch(path / "training_state.pt")
        if saved["global_batch"] != self.global_batch:
            raise ConfigError(
                f"cannot resume {path}: it was trained with a global batch of {saved['global_batch']} "
                f"sequences (batch_size x ranks x accumulation), now {self.global_batch}; keep it equal "
                "(e.g. double train.batch_size when halving the ranks)"
            )
        self.scheduler.load_state_dict(saved["scheduler"])
        per_rank = saved["per_rank"]
        mine = per_rank[rank] if len(per_rank) == world_size else per_rank[0]
        stream = dict(mine.get("data") or saved["data"])
        if isinstance(self.stream, (MixtureStream, StreamingStream)):
            if len(per_rank) != world_size or saved["batch_size"] != cfg.train.batch_size:
                raise ConfigError(
                    f"cannot resume {path}: a data mixture or stream resumes on the same number of ranks "
                    f"({len(per_rank)}) and train.batch_size ({saved['batch_size']})"
                )
        elif "cursor" in stream:
            # the same samples seen: the cursor counts batches of this run's per-rank size
            stream["cursor"] = (
                stream["cursor"]
                * saved["world_size"]
                * saved["batch_size"]
                // (self.env.dp_size * cfg.train.batch_size)
            )
        self.stream.load_state_dict(stream)
        ckpt.restore_rng(mine["rng"])
        engine = dict(mine["engine"])
        warning = None
        if len(per_rank) != world_size and engine.get("generators"):
            warning = (
                f"resuming {len(per_rank)}-rank stochastic-rounding state on {world_size} ranks: "
                "rounding noise is re-seeded (the run stays valid but is not bitwise reproducible)"
            )
            engine["generators"] = {}
        self.stepper.load_engine_state_dict(engine)
        state.step = int(saved["step"])
        state.tokens_seen = int(saved["tokens_seen"])
        self.guard.load_state_dict(saved)
        return warning
