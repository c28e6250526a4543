"""``dist.pp``: the training loop's step and model upkeep when every rank is one pipeline stage.

The loop composes :mod:`leantune.distributed.pipeline`: each rank builds the whole model, keeps
its stage (:func:`~leantune.distributed.pipeline.build_pipeline`) and trains it with its own fused
optimizer; one step is one schedule over ``dist.pp_microbatches`` micro-batches. Between
evaluations and saves a rank holds only its stage's weights (:meth:`PipelinedModel.release` empties
the others; tensor-parallel shards excepted). Evaluation, saving and exporting run the ordinary code
inside :meth:`PipelinedModel.whole`, which gives every rank the whole current model for that time:
each stage's parameters are broadcast from the rank that trains them (one broadcast per tensor).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leantune.training.guards import StepResult

__all__ = ["PipelinedModel"]


class PipelinedModel:
    """The pipeline of a run and what the loop needs of it.

    Args:
        model: the whole model (every rank builds it alike).
        cfg: the run's config (``dist.pp_schedule``, ``dist.pp_microbatches``).
        device: this rank's device.
        mesh: the job's ``(dp, pp, tp)`` device mesh: the stages are its ``pp`` dimension, the
            pipelines replicated over ``dp`` read different batches (``dist.strategy=ddp``).
    """

    def __init__(self, model: nn.Module, cfg: Any, device: torch.device, mesh: Any) -> None:
        from leantune.distributed.pipeline import build_pipeline

        self.model = model
        self.mesh = mesh
        self.group = mesh["pp"].get_group()
        dp = mesh["dp"]
        self.dp_group = dp.get_group() if dp.size() > 1 else None
        self.n_microbatches = cfg.dist.pp_microbatches or cfg.dist.pp
        # torch's schedules size their receive buffers from the first step: every batch is
        # right-padded to this length (labels -100: exact under causal attention)
        self.length = cfg.data.max_length
        self.pad_id = 0
        self.pipe = build_pipeline(
            model,
            n_microbatches=self.n_microbatches,
            schedule=cfg.dist.pp_schedule,
            device=device,
            group=self.group,
        )
        mine = [name for name, _ in self.pipe.module.named_parameters()]
        owners: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(owners, mine, group=self.group)
        self.owner = {
            name: dist.get_global_rank(self.group, stage)
            for stage, names in enumerate(owners)
            for name in names
        }
        self.mine = set(mine)
        self._released: dict[str, torch.Size] = {}
        missing = [n for n, _ in model.named_parameters() if n not in self.owner]
        if missing:
            raise ValueError(f"dist.pp: parameters that no stage trains: {missing[:3]}")

    @property
    def module(self) -> nn.Module:
        """This rank's stage: what its optimizer updates."""
        return self.pipe.module

    def collectives(self) -> Any:
        """A stage's optimizer's: with tensor parallelism the mesh collectives (statistics over the
        tensor-parallel shards, the norm over the stages and shards of this pipeline)."""
        if self.mesh["tp"].size() == 1:
            return self.pipe.collectives(self.dp_group)
        from leantune.distributed.collectives import MeshCollectives

        pipeline = self.mesh["pp", "tp"]._flatten("pp_tp").get_group()
        return MeshCollectives(dp_group=self.dp_group, norm_group=pipeline, stages=self.mesh["pp"].size())

    def describe(self) -> str:
        blocks = len(getattr(self.pipe.module, "block_names", []))
        return (
            f"pipeline: {dist.get_world_size(self.group)} stages ({self.pipe.schedule.__class__.__name__}, "
            f"{self.n_microbatches} micro-batches per step); this stage {blocks} decoder layers"
        )

    def step(self, optimizer: Any, batch: dict[str, torch.Tensor], device: torch.device) -> StepResult:
        """One optimizer step on ``batch`` (every stage calls it with the same batch)."""
        from leantune.data import IGNORE_INDEX
        from leantune.distributed.pipeline import pipeline_step

        ids, labels = batch["input_ids"], batch["labels"]
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        short = self.length - ids.shape[1]
        if short < 0:
            raise ValueError(
                f"dist.pp: a batch of {ids.shape[1]} tokens is longer than data.max_length={self.length}"
            )
        if short:
            ids = torch.nn.functional.pad(ids, (0, short), value=self.pad_id)
            labels = torch.nn.functional.pad(labels, (0, short), value=IGNORE_INDEX)
        out = pipeline_step(self.pipe, optimizer, ids.to(device), labels.to(device))
        result, loss = out.backward, out.loss
        if self.dp_group is not None:  # every pipeline's loss and tokens
            both = torch.tensor([loss, float(tokens)], dtype=torch.float64)
            dist.all_reduce(both, group=self.dp_group)
            loss, tokens = both[0].item() / dist.get_world_size(self.dp_group), int(both[1].item())
        return StepResult(
            loss=loss,
            tokens=tokens,
            skipped=result.skipped,
            zeroed=not result.skipped and bool(result.zeroed),
            grad_norm=result.grad_norm,
            metrics=None,
        )

    def release(self) -> None:
        """Free the weights of the other stages on this rank (their parameters stay, empty)."""
        for name, param in self.model.named_parameters():
            if name not in self.mine and not hasattr(param, "device_mesh") and param.numel():
                self._released[name] = param.shape
                param.data = param.data.new_empty(0)

    @contextmanager
    def whole(self) -> Iterator[None]:
        """The whole current model on every rank for the duration (evaluation, checkpoint, export)."""
        for name, param in self.model.named_parameters():
            if name in self._released:
                param.data = param.data.new_empty(self._released.pop(name))
        self.sync()
        try:
            yield
        finally:
            self.release()

    @torch.no_grad()
    def sync(self) -> None:
        """Make every rank's whole model current: each parameter from the stage that trains it."""
        for name, param in self.model.named_parameters():
            # a tensor-parallel shard goes to the same shard of the other stages
            local = param.to_local() if hasattr(param, "to_local") else param.data
            dist.broadcast(local, src=self.owner[name], group=self.group)
