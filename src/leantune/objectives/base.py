"""The seam between the training loop and what it optimises: an :class:`Objective` turns a batch
into a loss and its metrics; the loop, checkpointing, resume, signals, non-finite handling,
monitoring and distribution are shared by every objective."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

__all__ = ["Objective", "SFTObjective"]


class Objective(Protocol):
    """What the loop asks of a way of training.

    ``loss`` returns the micro-batch's loss (a scalar with gradients) and metrics (detached
    scalars, averaged over micro-batches and ranks like the loss, logged as ``train`` values).
    ``evaluate`` returns the evaluation values of the current model (every rank calls it).
    """

    description: str

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...

    def evaluate(self, trainer: Any) -> dict[str, Any]: ...

    def data_notes(self) -> list[str]: ...


class SFTObjective:
    """Next-token prediction on the labelled tokens (supervised fine-tuning, pre-training).

    Args:
        loss_fn: ``loss_fn(model, batch) -> loss``: the chunked loss or the model's own
            (:func:`leantune.loss.training_loss`).
    """

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn
        self.description: str = loss_fn.description

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_fn(model, batch), {}

    def evaluate(self, trainer: Any) -> dict[str, Any]:
        """Eval loss, perplexity and exact-match accuracy on the evaluation set."""
        from leantune.evaluate import eval_loss, exact_match
        from leantune.loss import ChunkedLMLoss

        t, e = trainer, trainer.cfg.eval
        if not t.data.eval:
            return {}
        values = eval_loss(
            t.model,
            t.data.eval,
            batch_size=t.cfg.train.batch_size,
            pad_id=t.tokenizer.pad_token_id,
            device=t.device,
            max_batches=e.max_batches,
            rank=t.data_rank,
            world_size=t.data_world,
            loss=self.loss_fn if isinstance(self.loss_fn, ChunkedLMLoss) else None,
            replicas=t.world_size // t.data_world,
        )
        # a sharded model's forward is collective (tensor parallelism, FSDP2's all-gathers): every
        # rank generates, in step, on the same prompts (greedy: the same tokens); rank 0 reports
        sharded = t.env.tp > 1 or (t.world_size > 1 and t.cfg.dist.strategy == "fsdp")
        if e.accuracy_samples and (t.is_main or sharded):
            values.update(
                exact_match(
                    t.model,
                    t.tokenizer,
                    t.data.eval,
                    device=t.device,
                    max_new_tokens=e.max_new_tokens,
                    limit=e.accuracy_samples,
                )  # fmt: skip
            )
        return values

    def data_notes(self) -> list[str]:
        return []
