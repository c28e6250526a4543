"""The training loop: setup -> train -> train_step -> evaluate -> save -> close.

Every optimizer goes through one code path: fused optimizers (AdaLomo, LOMO, ``*_in_backward``)
expose ``backward(loss)`` themselves, ordinary ones are wrapped in :class:`leantune.optim.Stepper`.
What is optimised is an :class:`~leantune.objectives.Objective` (next-token prediction, or a
preference loss); the loop does not know which. The components it composes live in
:mod:`leantune.training`: builders, the run directory, model I/O, the checkpointer, the guards and
the report. A resumed run continues from its checkpoint exactly: model, optimizer state,
scheduler, data position and random states are restored.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leantune import checkpoint as ckpt
from leantune.config import Config, render_config
from leantune.data import MixtureStream, build_datasets, load_tokenizer
from leantune.data.packing import packing_is_exact, unpack_rows
from leantune.distributed.runtime import all_reduce_sum, init_distributed, run_on_main
from leantune.distributed.strategy import attach_optimizer, mesh_collectives, wrap_model
from leantune.loss import training_loss
from leantune.monitor import Monitor, peak_memory_bytes
from leantune.optim import is_fused
from leantune.training import build
from leantune.training.checkpointer import Checkpointer, TrainState
from leantune.training.guards import NonfiniteGuard, StepResult, StopRequest, nonfinite_weights
from leantune.training.metrics import Clock, MetricWindow
from leantune.training.model_io import make_model_io, sync_optimizer_with_mask
from leantune.training.report import announce, print_summary
from leantune.training.run_dir import CommandLine, resolve_run_dir, resume_hint

__all__ = ["RunSummary", "StepResult", "Trainer", "TrainerHook", "TrainingError", "train"]


class TrainingError(RuntimeError):
    """The run cannot continue (the message gives the diagnosis)."""


@dataclass
class RunSummary:
    """What a run did: where it lives, how far it got, the final model and the final metrics."""

    run_dir: Path
    steps: int
    final_dir: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


class TrainerHook:
    """Called by :meth:`Trainer.train` around every optimizer step; override what you need (tests
    and benchmarks measure, inject faults or stop a run this way instead of subclassing)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this process (after setup and any resume)."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        """Before the step that will be number ``step + 1``."""

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None:
        """After step ``step`` (1-based) was applied and logged, before evaluation and saving."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After :meth:`Trainer.train` returned or raised (after the final save and export): release
        what :meth:`on_train_start` took. Also called when a step raised or the run was stopped."""


class Trainer:
    """Trains a causal LM as described by a :class:`~leantune.config.Config`.

    Args:
        cfg: the run's config.
        hooks: :class:`TrainerHook` s called around every step.
        origin: the command line the run came from, repeated in the "resume with" hints.

    Example:
        >>> from leantune.config import load_config
        >>> summary = Trainer(load_config(None, ["train.max_steps=100"])).run()
    """

    def __init__(
        self, cfg: Config, *, hooks: Sequence[TrainerHook] = (), origin: CommandLine | None = None
    ) -> None:
        self.cfg = cfg
        self.hooks = list(hooks)
        self.origin = origin
        self.state = TrainState()
        self.stop = StopRequest()
        self.rank, self.world_size = 0, 1
        self.data_rank, self.data_world = 0, 1
        self.mesh: Any = None  # the (dp, tp) device mesh under tensor parallelism
        self.pipeline: Any = None  # leantune.training.pipelined.PipelinedModel under dist.pp
        self.is_main = True
        self.hft: Any = None  # leantune.hft.HftTracker when train.hft is on
        self.allocator_note: str | None = None  # what `leantune train` did to glibc's allocator
        self.run_dir: Path | None = None
        self.resumed_from: Path | None = None

    # -------------------------------------------------------------- counters
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def tokens_seen(self) -> int:
        return self.state.tokens_seen

    @property
    def last_eval(self) -> dict[str, Any]:
        return self.state.last_eval

    @last_eval.setter
    def last_eval(self, values: dict[str, Any]) -> None:
        self.state.last_eval = values

    @property
    def nonfinite_total(self) -> int:
        return self.guard.total if hasattr(self, "guard") else 0

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop at the end of the current step as on SIGTERM: save a checkpoint and return."""
        self.stop.request(signum)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Build every component the config describes, resume if asked, and announce the run."""
        cfg = self.cfg
        self.env = init_distributed(cfg.dist.strategy, cfg.train.device, tp=cfg.dist.tp, pp=cfg.dist.pp)
        self.rank, self.world_size, self.is_main = self.env.rank, self.env.world_size, self.env.is_main
        # the ranks of a tensor-parallel group read the same batches: data is split over dp only
        self.data_rank, self.data_world = self.env.dp_rank, self.env.dp_size
        self.mesh = self.env.mesh() if cfg.dist.tp > 1 or cfg.dist.pp > 1 else None
        self.device = self.env.device
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        build.check_paths(cfg)
        self.tokenizer = load_tokenizer(
            cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
        )
        if cfg.train.objective != "sft":
            from leantune.data.pairs import build_pair_datasets

            self.data = build_pair_datasets(cfg.data, self.tokenizer)
        else:
            if cfg.data.cache_dir and self.world_size > 1:
                run_on_main(lambda: build_datasets(cfg.data, self.tokenizer))  # rank 0 fills the cache first
            self.data = build_datasets(cfg.data, self.tokenizer)
        self.model, self.hft = build.build_model(cfg, self.tokenizer, self.device)
        if self.data.pack_stats is not None and not packing_is_exact(
            self.model, self.device, len(self.tokenizer)
        ):
            # the family's code ignores the position ids in its mask: samples would see each other
            self.data.train, self.data.pack_stats = unpack_rows(self.data.train), None
            self.data.pack_refused = f"{type(self.model).__name__} does not keep packed samples apart"
        # Before sharding: the probe batch runs on the whole model, locally; the head keeps the
        # forward patched in here through fully_shard (which changes its class, not its __dict__).
        o = cfg.optim
        two_pass = is_fused(o.name) and (o.clip_grad_norm is not None or o.loss_scale is not None)
        refuse = (
            "FSDP2 with a measuring backward pass first (optim.clip_grad_norm or optim.loss_scale with "
            "a fused optimizer) crashes inside PyTorch's autograd engine with the chunked loss"
            if cfg.dist.strategy == "fsdp" and self.world_size > 1 and two_pass
            else None
        )
        self.loss_fn, self.loss_note = training_loss(self.model, cfg.train.loss_chunk, refuse=refuse)
        self.objective = self._build_objective()
        # train_model runs the forward passes (a DDP wrapper for ordinary optimizers under ddp);
        # self.model is the model itself, for evaluation and saving.
        self.train_model = wrap_model(
            self.model,
            cfg.dist.strategy,
            fused=is_fused(cfg.optim.name),
            device=self.device,
            dist_cfg=cfg.dist,
            mesh=self.mesh,
        )
        if cfg.dist.pp > 1:
            from leantune.training.pipelined import PipelinedModel

            self.pipeline = PipelinedModel(self.model, cfg, self.device, self.mesh)
            self.train_model = self.pipeline.module
        self.stream = self._build_stream()
        self.total_steps = cfg.train.max_steps or max(
            1, math.ceil(cfg.train.epochs * self.stream.batches_per_epoch / cfg.train.accumulation_steps)
        )
        collectives = mesh_collectives(self.mesh, cfg.dist.strategy) if cfg.dist.tp > 1 else "auto"
        if self.pipeline is not None:  # each stage's optimizer holds its own parameters only
            collectives = self.pipeline.collectives()
        self.optimizer, self.stepper = build.build_optimizer(
            cfg, self.pipeline.module if self.pipeline is not None else self.model, self.hft, collectives
        )
        if self.pipeline is None:
            attach_optimizer(self.optimizer, cfg.dist.strategy, self.mesh)
        sync_optimizer_with_mask(self.optimizer, self.model, self.hft, cfg.optim.name)
        self.scheduler = build.build_scheduler(self.optimizer, cfg, self.total_steps)
        # Every rank must use rank 0's run directory (its default name is a timestamp).
        self.run_dir, resume_from = run_on_main(lambda: resolve_run_dir(cfg))
        self.model_io = make_model_io(
            cfg, self.model, self.tokenizer, self.hft, self.run_dir, is_main=self.is_main
        )
        self.guard = NonfiniteGuard(
            cfg.train.max_nonfinite, cfg.optim.lr, say=lambda text: self.monitor.print(text),
            bad_weights=self._nonfinite_weights, hint=self._resume_hint,
        )  # fmt: skip
        self.checkpointer = Checkpointer(
            cfg, self.run_dir, self.env, self.model, self.model_io, self.optimizer, self.stepper,
            self.scheduler, self.stream, self.guard,
            bad_weights=self._nonfinite_weights, hint=self._resume_hint,
        )  # fmt: skip
        warning = None
        if resume_from is not None:
            warning = self.checkpointer.load(resume_from, self.state)
            self.resumed_from = resume_from
        self._prepare_objective(resume_from)
        self.monitor = Monitor(
            self.run_dir,
            self.total_steps,
            enabled=self.is_main,
            progress=cfg.log.progress,
            tensorboard=cfg.log.tensorboard,
            start_step=self.step,
            device=self.device,
        )
        if self.is_main:
            # atomic: a run killed while rewriting it on resume must still resume
            ckpt.write_text_atomic(self.run_dir / "config.yaml", render_config(cfg, comments=False))
        announce(self, resume_from, warning)
        if self.pipeline is not None:  # after loading and announcing the whole model
            self.pipeline.release()

    def _build_objective(self) -> Any:
        from leantune.objectives import build_objective

        return build_objective(self)

    def _build_stream(self) -> Any:
        make = getattr(self.objective, "build_stream", None)
        if make is not None:
            return make(self)
        return build.build_stream(self.cfg, self.data, self.tokenizer, self.data_rank, self.data_world)

    def _prepare_objective(self, resume_from: Path | None) -> None:
        """The objective's own preparation once the run directory is known (e.g. DPO's reference
        log-probs, computed before the first step or read back on resume)."""
        prepare = getattr(self.objective, "prepare", None)
        if prepare is not None:
            prepare(self, resume_from)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.data_world * self.cfg.train.accumulation_steps

    # ----------------------------------------------------------------- train
    def train_step(self) -> StepResult:
        """One optimizer step over ``accumulation_steps`` micro-batches."""
        if self.pipeline is not None:
            result = self.pipeline.step(self.optimizer, self.stream.next_batch(), self.device)
            self.scheduler.step()
            return result
        losses, tokens, result, lost = [], 0, None, False
        sums: dict[str, float] = {}
        for _ in range(self.cfg.train.accumulation_steps):
            batch = self.stream.next_batch()
            n_tokens = int(batch["attention_mask"].sum())  # host tensor: no device sync
            if n_tokens == batch["attention_mask"].numel() or "position_ids" in batch:
                # No padding: without the (all-ones) mask transformers builds none and SDPA takes
                # its causal path with native grouped-query attention; given the mask, several
                # families (sliding window, fused qkv) materialise an L x L mask in every layer.
                # Packed: the position ids delimit the samples (see leantune.data.packing).
                del batch["attention_mask"]
            batch = {k: v.to(self.device) for k, v in batch.items()}
            tokens += n_tokens
            if lost:
                continue  # this step is already lost; keep the data position exact
            loss, metrics = self.objective.loss(self.train_model, batch)
            # One sync per micro-batch: the mean loss over ranks, and whether any rank's is not
            # finite (then every rank skips together, or the collectives would deadlock); the
            # objective's metrics ride along.
            names = sorted(metrics)
            local = [
                loss.detach().float(),
                (~torch.isfinite(loss)).float(),
                torch.tensor(float(n_tokens), device=loss.device),
                *(metrics[k].detach().float().to(loss.device) for k in names),
            ]
            stats = all_reduce_sum(torch.stack(local)).tolist()
            losses.append(stats[0] / self.world_size)
            tokens += int(stats[2]) // self.env.tp - int(local[2])  # every data-parallel rank's tokens
            for k, v in zip(names, stats[3:]):
                sums[k] = sums.get(k, 0.0) + v / self.world_size
            if stats[1] > 0:
                lost = True
                losses[-1] = float("nan")
                self.stepper.zero_grad()  # drop a partial accumulation: never step on NaN
                continue
            result = self.stepper.backward(loss)
        skipped = lost or result is None or result.skipped
        self.scheduler.step()
        return StepResult(
            loss=sum(losses) / len(losses),
            tokens=tokens,
            skipped=skipped,
            # fused optimizers without a measuring pass: a tensor's inf/nan gradient was zeroed
            zeroed=not skipped and bool(getattr(result, "zeroed", False)),
            grad_norm=None if result is None else result.grad_norm,
            metrics={k: v / len(losses) for k, v in sums.items()} if sums and not lost else None,
        )

    def _nonfinite_weights(self) -> list[str]:
        return nonfinite_weights(self.model, self.device)

    def evaluate(self) -> dict[str, Any]:
        """The objective's evaluation of the current model (for SFT: eval loss, perplexity and
        exact-match accuracy on the evaluation set)."""
        with self._whole_model():
            values = self.objective.evaluate(self)
        if values:
            self.last_eval = values
        return values

    def save(self) -> Path:
        """Write a resumable checkpoint of the current step and prune old ones (every rank calls this)."""
        with self._whole_model():
            return self.checkpointer.save(self.state)

    def export(self) -> Path:
        """Write the final model to RUN_DIR/final (HF format; the adapter for peft runs)."""
        with self._whole_model():
            return self.checkpointer.export(self.state)

    def _whole_model(self) -> Any:
        # dist.pp: between evaluations and saves a rank holds only its stage's weights
        return self.pipeline.whole() if self.pipeline is not None else contextlib.nullcontext()

    def train(self) -> RunSummary:
        """Step until ``total_steps``, logging every ``log.every`` steps, evaluating every
        ``eval.every`` and saving every ``train.save_every``; a stop request (SIGINT, SIGTERM,
        :meth:`request_stop`) saves a checkpoint and returns. At the end: evaluate, save, export."""
        for hook in self.hooks:
            hook.on_train_start(self)
        try:
            return self._train_loop()
        finally:
            for hook in self.hooks:
                hook.on_train_end(self)

    def _train_loop(self) -> RunSummary:
        cfg = self.cfg
        clock = Clock()
        window = MetricWindow(clock)
        run_tokens, run_start_step = 0, self.step
        with self.stop:
            while self.step < self.total_steps:
                self.model_io.on_step_start(
                    self.step, self.stream.epoch_progress, self.optimizer, self.monitor.print
                )
                for hook in self.hooks:
                    hook.on_step_start(self, self.step)
                result = self.train_step()
                self.step += 1
                self.state.tokens_seen += result.tokens
                run_tokens += result.tokens
                self.guard.observe(self.step, result)
                window.observe(result)
                if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                    self.monitor.log_train(self.step, self._train_record(window))
                else:
                    self.monitor.advance(self.step)
                for hook in self.hooks:
                    hook.on_step_end(self, self.step, result)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                    with clock.paused():
                        self.monitor.log_eval(self.step, self.evaluate())
                if self.checkpointer.due(self.step, self.total_steps):
                    with clock.paused():
                        self.save()
                if self.stop.requested(self.device):
                    path = self.save()
                    self.monitor.print(
                        f"\n{self.stop.name} received: saved {path} at step {self.step}. Resume with:\n"
                        f"  leantune train {self._resume_hint()}"
                    )
                    return RunSummary(self.run_dir, self.step, None, {}, interrupted=True)
        train_time = clock.now()
        metrics = self.evaluate()
        if metrics:
            self.monitor.log_eval(self.step, metrics)
        metrics["tokens_per_s"] = run_tokens / max(train_time, 1e-9)
        metrics["peak_mem_bytes"] = peak_memory_bytes(self.device)
        metrics["train_seconds"] = train_time
        metrics["steps_this_run"] = self.step - run_start_step
        if isinstance(self.stream, MixtureStream):
            metrics["data_mixture"] = self.stream.realised()
            self.monitor.print(self.stream.describe())
        self.monitor.record("summary", self.step, metrics)
        self.save()
        final = self.export()
        return RunSummary(self.run_dir, self.step, final, metrics)

    def _train_record(self, window: MetricWindow) -> dict[str, Any]:
        averages = window.flush(self.world_size)
        values = {
            "loss": averages.pop("loss"),
            # float(): torchao's optimizers keep lr as a tensor
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "tokens_per_s": averages.pop("tokens_per_s"),
            "tokens_per_s_per_device": averages.pop("tokens_per_s_per_device"),
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "epoch": self.stream.epoch_progress,
            "skipped_steps": self.nonfinite_total,
        }
        return {**values, **averages}

    def _resume_hint(self) -> str:
        """The arguments of ``leantune train`` that resume this run."""
        return resume_hint(self.cfg, self.run_dir, self.origin)

    # ----------------------------------------------------------------- close
    def print_summary(self, summary: RunSummary) -> None:
        print_summary(self, summary)

    def close(self) -> None:
        """Close the monitor and, under torch.distributed, the process group (after a barrier)."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()
        from leantune.distributed.runtime import is_distributed

        if is_distributed():
            import torch.distributed as dist

            # Every rank must be done (rank 0 plots and prints last) before the group goes away:
            # tearing it down under a peer still using it aborts that peer.
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()

    def run(self) -> RunSummary:
        """setup -> train -> plot -> close, printing a summary."""
        try:
            self.setup()
            summary = self.train()
            if self.is_main and self.cfg.log.plot and not summary.interrupted:
                from leantune.plot import plot_run

                plot_run(self.run_dir)
            if not summary.interrupted:
                self.print_summary(summary)
            return summary
        finally:
            self.close()


def train(cfg: Config) -> RunSummary:
    """Train with ``cfg`` and return the summary (see :class:`Trainer`)."""
    return Trainer(cfg).run()
