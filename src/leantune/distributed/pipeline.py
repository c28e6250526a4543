"""Pipeline parallelism for the fused optimizers, on ``torch.distributed.pipelining``.

Each rank of the pipeline group holds one contiguous part of a causal LM (stage 0 the embedding and
the first layers, the last stage the last layers, the final norm and the head) wrapped in torch's
:class:`~torch.distributed.pipelining.PipelineStage`, and a GPipe or 1F1B schedule runs the
micro-batches; torch does all the communication. The fused optimizer of a stage updates only that
stage's parameters, from its own backward hooks:

* ``opt.begin_micro_batches(n)`` before the schedule: every gradient the schedule's backward
  passes produce is added to the parameter's fp32 accumulation buffer, divided by ``n`` and by the
  loss scale (so the buffers hold the mean gradient of the ``n`` micro-batches);
* ``opt.end_micro_batches()`` after it: with clipping or dynamic loss scaling, the squared norms of
  the stages' disjoint parameters are summed over the pipeline group
  (:class:`PipelineCollectives`), so every stage clips by the same coefficient and skips the same
  overflowing step; then every parameter is updated once.

So one pipeline step equals one process running the same optimizer on the whole batch
(``tests/distributed/test_pipeline.py``). Gradient accumulation *is* the micro-batching: for a
larger batch, raise ``n_microbatches``.

Loss normalisation: the loss of a micro-batch is the *sum* of its token losses divided by the
number of label tokens of the whole batch over ``n`` (sum-then-divide), so the mean over the
micro-batches is the mean token loss of the whole batch, exactly, whatever the number of ``-100``
labels in each micro-batch.

Example (``torchrun --nproc-per-node 2 train.py``)::

    dist.init_process_group("gloo")
    pipe = build_pipeline(model, n_microbatches=4, schedule="1f1b")
    opt = AdaLomo(pipe.module, lr=1e-3, clip_grad_norm=1.0, collectives=pipe.collectives())
    for input_ids, labels in loader:
        out = pipeline_step(pipe, opt, input_ids, labels)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from leantune.anatomy import find_blocks
from leantune.optim.collectives import Collectives
from leantune.optim.engine import BackwardResult, FusedOptimizer

__all__ = [
    "SCHEDULES",
    "CausalLMLoss",
    "Pipeline",
    "PipelineCollectives",
    "PipelineStepResult",
    "StageModule",
    "build_pipeline",
    "pipeline_step",
    "split_causal_lm",
    "stage_layer_counts",
]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
# Families whose decoder forward StageModule reproduces exactly (embedding, causal mask, rotary
# position embeddings, layers, norm, head). Others do more in their forward (Gemma scales the
# embeddings, Mistral/Qwen2 may use sliding-window masks): add a family after checking that its
# stages, composed, give the logits of the whole model (tests/distributed/test_pipeline.py).
SUPPORTED_FAMILIES = ("llama",)
IGNORE_INDEX = -100


class PipelineCollectives(Collectives):
    """Collectives of a fused optimizer on one pipeline stage.

    Stages hold disjoint parameters, so the global squared gradient norm is the sum of the stages'
    (all-reduced over the pipeline group: every stage clips by the same coefficient and skips the
    same overflowing step). Every tensor is whole on its stage: no statistic is summed over shards.

    With ``dp_group`` (pipelines replicated for data parallelism, each reading its own part of the
    batch), every gradient is first averaged over the replicas of the stage inside its hook; the
    replicas then hold the same gradients, so the norm is still summed over the pipeline only.

    Args:
        group: the pipeline process group (``None``: the default group).
        dp_group: the replicas of this stage (``None``: one pipeline).
    """

    sharded = False

    def __init__(
        self, group: dist.ProcessGroup | None = None, dp_group: dist.ProcessGroup | None = None
    ) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.replicated = self.dp_size > 1

    def average_gradient(self, grad: Tensor) -> Tensor:
        dist.all_reduce(grad, group=self.dp_group)
        return grad.div_(self.dp_size)

    def sum_square_norms(self, total: Tensor) -> Tensor:
        dist.all_reduce(total, group=self.group)
        return total

    def seed_offset(self) -> int:
        # Different tensors per stage: independent stochastic-rounding streams.
        return 1_000_003 * self.rank


def stage_layer_counts(
    n_layers: int, num_stages: int, layers_per_stage: list[int] | None = None
) -> list[int]:
    """How many decoder layers each stage holds (contiguous, the first stages take the remainder).

    Raises:
        ValueError: fewer layers than stages, or a ``layers_per_stage`` that does not fit.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"Invalid number of pipeline stages: {num_stages!r} (must be an int >= 1)")
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if (
            len(counts) != num_stages
            or any(not isinstance(c, int) or c < 1 for c in counts)
            or sum(counts) != n_layers
        ):
            raise ValueError(
                f"Invalid layers_per_stage {counts}: need {num_stages} ints >= 1 summing to the model's "
                f"{n_layers} decoder layers"
            )
        return counts
    if num_stages > n_layers:
        raise ValueError(
            f"cannot split {n_layers} decoder layers into {num_stages} pipeline stages: every stage needs "
            f"at least one layer (use at most {n_layers} stages)"
        )
    base, extra = divmod(n_layers, num_stages)
    return [base + (i < extra) for i in range(num_stages)]


@cache
def _mask_arg_names() -> tuple[str, ...]:
    from transformers.masking_utils import create_causal_mask

    return tuple(inspect.signature(create_causal_mask).parameters)


def _causal_mask(config: Any, hidden: Tensor, position_ids: Tensor) -> Any:
    """The decoder's causal mask, as its own forward builds it (no padding mask, no cache)."""
    from transformers.masking_utils import create_causal_mask

    names = _mask_arg_names()  # the arguments were renamed across transformers versions
    kwargs: dict[str, Any] = {"config": config, "attention_mask": None, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in names else "input_embeds"] = hidden
    for name in ("cache", "past_key_values"):
        if name in names:
            kwargs[name] = None
    if "cache_position" in names:
        kwargs["cache_position"] = position_ids[0]
    return create_causal_mask(**kwargs)


def _attach(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` under its dotted name in the model, so parameter names stay the same."""
    *path, leaf = name.split(".")
    parent = root
    for part in path:
        child = parent._modules.get(part)
        if child is None:
            child = nn.ModuleDict()
            parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, module)


class StageModule(nn.Module):
    """One contiguous part of a LLaMA-style causal LM: what a pipeline stage runs.

    The first stage maps ``input_ids`` ``(batch, seq)`` to hidden states ``(batch, seq, hidden)``;
    the others map hidden states to hidden states, the last one to logits ``(batch, seq, vocab)``.
    Every stage builds its position ids, causal mask and rotary embeddings itself (nothing but the
    hidden states crosses stages). The submodules are those of the original model (not copies),
    registered under their names in it: ``named_parameters()`` and ``state_dict()`` use the model's
    names, and the stages' state dicts together are the model's.

    Sequences must not be left-padded: no attention mask crosses the stages (right padding with
    ``-100`` labels is exact under causal attention).
    """

    def __init__(
        self,
        model: nn.Module,
        block_names: list[str],
        *,
        embed: str | None,
        norm: str | None,
        head: str | None,
        rotary: str,
    ) -> None:
        super().__init__()
        self.config = model.config
        self.block_names = list(block_names)
        self.embed_name, self.norm_name, self.head_name, self.rotary_name = embed, norm, head, rotary
        for name in (embed, *block_names, norm, head, rotary):
            if name is not None:
                _attach(self, name, model.get_submodule(name))

    @property
    def is_first(self) -> bool:
        return self.embed_name is not None

    @property
    def is_last(self) -> bool:
        return self.head_name is not None

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.get_submodule(self.embed_name)(x) if self.is_first else x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = _causal_mask(self.config, hidden, position_ids)
        position_embeddings = self.get_submodule(self.rotary_name)(hidden, position_ids=position_ids)
        for name in self.block_names:
            hidden = self.get_submodule(name)(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
        if self.is_last:
            hidden = self.get_submodule(self.head_name)(self.get_submodule(self.norm_name)(hidden))
        return hidden


def split_causal_lm(
    model: nn.Module, num_stages: int, stage_index: int, *, layers_per_stage: list[int] | None = None
) -> StageModule:
    """The part of ``model`` that pipeline stage ``stage_index`` of ``num_stages`` runs.

    Args:
        model: a LLaMA-style Hugging Face causal LM (embedding, decoder layers, final norm, rotary
            embeddings, untied head).
        num_stages: number of stages (the pipeline group's size).
        stage_index: this stage.
        layers_per_stage: decoder layers of each stage; default: as even as possible, the first
            stages taking the remainder.

    Raises:
        ValueError: an unsupported family, tied input/output embeddings across stages, or more
            stages than decoder layers.
    """
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"pipeline stages are implemented for {', '.join(SUPPORTED_FAMILIES)} decoders, not {family!r}: "
            "each stage re-implements the decoder's forward, and families differ there (embedding "
            "scaling, sliding-window masks)"
        )
    blocks = find_blocks(model)
    counts = stage_layer_counts(len(blocks), num_stages, layers_per_stage)
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"Invalid stage_index {stage_index!r} for {num_stages} stages")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    decoder = model.get_decoder()
    norm, rotary = getattr(decoder, "norm", None), getattr(decoder, "rotary_emb", None)
    if head is None or norm is None or rotary is None:
        raise ValueError(
            f"{type(model).__name__} lacks an output head, a final `norm` or a `rotary_emb` on its decoder: "
            "not a LLaMA-style causal LM"
        )
    tied = head.weight is embed.weight or bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and num_stages > 1:
        raise ValueError(
            "the model ties its input and output embeddings (tie_word_embeddings=True), but the embedding "
            f"lives on stage 0 and the head on stage {num_stages - 1}: each would train its own copy and "
            "the two would silently diverge. Untie them before splitting (a different model: the head "
            "then trains on its own), e.g. model.lm_head.weight = nn.Parameter("
            "model.lm_head.weight.detach().clone()); model.config.tie_word_embeddings = False"
        )
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    start = sum(counts[:stage_index])
    mine = [name for name, _ in blocks[start : start + counts[stage_index]]]
    last = stage_index == num_stages - 1
    return StageModule(
        model,
        mine,
        embed=names[id(embed)] if stage_index == 0 else None,
        norm=names[id(norm)] if last else None,
        head=names[id(head)] if last else None,
        rotary=names[id(rotary)],
    )


class CausalLMLoss:
    """Causal-LM loss of one micro-batch on the last stage, normalised by the whole batch.

    ``sum(token losses of the micro-batch) * scale / (label tokens of the batch / n)``: labels are
    shifted by one, ``-100`` is ignored. The mean over the ``n`` micro-batches is then ``scale``
    times the mean token loss of the whole batch, for any distribution of ``-100`` labels.
    :meth:`prepare` sets ``scale`` and the divisor before each step.
    """

    def __init__(self) -> None:
        self.scale = 1.0
        self.divisor = 1.0

    def prepare(self, labels: Tensor, n_microbatches: int, scale: float) -> None:
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        self.scale, self.divisor = float(scale), max(tokens, 1) / n_microbatches

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        total = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels[:, 1:].flatten().to(logits.device),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total * (self.scale / self.divisor)


@dataclass
class Pipeline:
    """This rank's part of a pipeline: build the optimizer on :attr:`module`.

    Attributes:
        module: the stage's part of the model (:class:`StageModule`).
        stage: torch's ``PipelineStage`` around it.
        schedule: the GPipe or 1F1B schedule that runs the micro-batches.
        loss_fn: the last stage's loss (:class:`CausalLMLoss`).
        group: the pipeline process group (``None``: the default group).
        n_microbatches: micro-batches per step (the schedule's).
    """

    module: StageModule
    stage: PipelineStage
    schedule: ScheduleGPipe | Schedule1F1B
    loss_fn: CausalLMLoss
    group: dist.ProcessGroup | None
    n_microbatches: int

    @property
    def num_stages(self) -> int:
        return self.stage.num_stages

    @property
    def stage_index(self) -> int:
        return self.stage.stage_index

    def collectives(self, dp_group: dist.ProcessGroup | None = None) -> PipelineCollectives:
        """The collectives to build this stage's fused optimizer with (``dp_group``: this stage's
        replicas under data parallelism)."""
        return PipelineCollectives(self.group, dp_group)


def build_pipeline(
    model: nn.Module,
    *,
    n_microbatches: int,
    schedule: str = "1f1b",
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    layers_per_stage: list[int] | None = None,
) -> Pipeline:
    """Split ``model`` over the ranks of ``group`` (one stage per rank) and build the schedule.

    Every rank passes the whole model (e.g. built on the ``meta`` device and materialised after the
    split, for a large one) and keeps its own stage's part.

    Args:
        model: a LLaMA-style causal LM (see :func:`split_causal_lm`).
        n_microbatches: micro-batches per step; the batch size must be a multiple of it.
        schedule: ``"gpipe"`` or ``"1f1b"`` (which needs ``n_microbatches >= stages``).
        group: the pipeline process group (``None``: the default group); stage ``i`` is its rank ``i``.
        device: where the stage runs (its part of the model is moved there); default: where its
            parameters are.
        layers_per_stage: see :func:`split_causal_lm`.

    Raises:
        ValueError: an unknown schedule, a bad split, tied embeddings, too few micro-batches.
    """
    key = schedule.lower() if isinstance(schedule, str) else schedule
    if key not in SCHEDULES:
        raise ValueError(f"Invalid pipeline schedule: {schedule!r} (choose from {', '.join(SCHEDULES)})")
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"Invalid n_microbatches: {n_microbatches!r} (must be an int >= 1)")
    if not dist.is_initialized():
        raise RuntimeError("build_pipeline needs torch.distributed initialised (one process per stage)")
    num_stages, stage_index = dist.get_world_size(group), dist.get_rank(group)
    if key == "1f1b" and n_microbatches < num_stages:
        raise ValueError(
            "the 1F1B schedule needs at least as many micro-batches as stages: "
            f"{n_microbatches} < {num_stages}"
        )
    module = split_causal_lm(model, num_stages, stage_index, layers_per_stage=layers_per_stage)
    if device is not None:
        module.to(device)
    dev = torch.device(device) if device is not None else next(module.parameters()).device
    stage = PipelineStage(module, stage_index, num_stages, dev, group=group)
    loss_fn = CausalLMLoss()
    # scale_grads=False: torch would divide each .grad by n after the schedule; the fused
    # optimizer's hooks have consumed the gradients by then and do the division themselves.
    sched = SCHEDULES[key](stage, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(module, stage, sched, loss_fn, group, n_microbatches)


@dataclass(frozen=True)
class PipelineStepResult:
    """What :func:`pipeline_step` did.

    Attributes:
        loss: mean token loss of the whole batch (unscaled), the same on every stage.
        backward: the optimizer's result (``grad_norm`` is the global norm over all stages).
    """

    loss: float
    backward: BackwardResult


def pipeline_step(
    pipe: Pipeline, opt: FusedOptimizer, input_ids: Tensor, labels: Tensor
) -> PipelineStepResult:
    """One training step: run the schedule's micro-batches and update every stage once.

    Every rank of the pipeline calls it with the same global batch (the first stage reads
    ``input_ids``, the last ``labels``).

    Args:
        pipe: this rank's :class:`Pipeline`.
        opt: a fused optimizer built on ``pipe.module`` with ``collectives=pipe.collectives()``.
        input_ids: ``(batch, seq)`` token ids, ``batch`` a multiple of ``pipe.n_microbatches``.
        labels: ``(batch, seq)``, unshifted, ``-100`` where no loss is wanted.

    Raises:
        ValueError: a batch that does not split, an optimizer without pipeline collectives or
            holding parameters of other stages.
    """
    n = pipe.n_microbatches
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(
            "input_ids and labels must both be (batch, seq); got "
            f"{tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    if input_ids.shape[0] % n:
        raise ValueError(f"batch size {input_ids.shape[0]} is not a multiple of n_microbatches={n}")
    spans = isinstance(opt.collectives, PipelineCollectives) or getattr(
        opt.collectives, "spans_pipeline", False
    )
    if pipe.num_stages > 1 and not spans:
        raise ValueError(
            f"the optimizer's collectives are {type(opt.collectives).__name__}: build it with "
            "collectives=pipe.collectives(), so that the clipping norm and overflow checks span all stages"
        )
    own = {id(p) for p in pipe.module.parameters()}
    if any(id(p) not in own for p in opt.trainable_parameters()):
        raise ValueError("the optimizer holds parameters of other stages: build it on pipe.module")

    scale = opt.begin_micro_batches(n)
    losses: list[Tensor] = []
    dev = pipe.stage.device
    first, last = pipe.stage.is_first, pipe.stage.is_last
    if last:
        pipe.loss_fn.prepare(labels, n, scale)
    args = (input_ids.to(dev),) if first else ()
    kwargs: dict[str, Any] = (
        {"target": labels.to(dev), "losses": losses, "return_outputs": False} if last else {}
    )
    try:
        pipe.schedule.step(*args, **kwargs)
    except BaseException:
        opt.abort_micro_batches()  # the optimizer stays usable (e.g. after a KeyboardInterrupt)
        raise
    result = opt.end_micro_batches()

    loss = torch.zeros((), dtype=torch.float32, device=dev)
    if last:
        loss = torch.stack([x.detach().float() for x in losses]).sum() / (n * scale)
    if pipe.num_stages > 1:
        src = pipe.num_stages - 1
        dist.broadcast(
            loss,
            src=dist.get_global_rank(pipe.group, src) if pipe.group is not None else src,
            group=pipe.group,
        )
    return PipelineStepResult(loss=loss.item(), backward=result)
