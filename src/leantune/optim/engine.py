"""The in-backward engine: one hook per trainable parameter, shared by every fused optimizer.

A fused optimizer updates each parameter the moment its gradient is final during ``backward()``
(``Tensor.register_post_accumulate_grad_hook``, which also fires once for tied weights, after both
contributions are summed) and frees that gradient right away. Peak gradient memory is then one
parameter's gradient instead of all of them.

On top of the hooks the engine provides what earlier fused optimizers lacked:

* **exact global gradient-norm clipping**: ``opt.backward(loss)`` runs backward twice; the first pass
  only measures ``sum(g^2)`` (on the device, no host sync) and frees each gradient, the clip
  coefficient is computed once, then the second pass updates. Cost: one extra backward.
* **fp16 dynamic loss scaling** without corrupting weights: overflow is detected in the measuring
  pass, before any weight changes, with a single host synchronisation per step.
* **no NaN in the weights** without a measuring pass either: the whole gradient is not known before
  the first update, so the step cannot be skipped; instead each parameter's gradient is checked
  just before its update. On the CPU a parameter with an inf/nan gradient is left untouched (one
  read-only sum per tensor); on accelerators the gradient is zeroed on the device (no per-tensor
  host sync). The step reports ``zeroed=True`` (one host sync per step). With clipping or dynamic
  loss scaling such a step is skipped whole instead.
* **gradient accumulation**: the first ``k-1`` calls of ``opt.backward`` move each gradient into an
  fp32 accumulation buffer (the memory cost: 4 bytes per trainable parameter while accumulating);
  the ``k``-th call applies one update with the mean gradient.
* rounding control when writing updates to bf16/fp16 weights (:mod:`leantune.optim.precision`).

Subclasses implement :meth:`FusedOptimizer._update`, which receives an :class:`UpdateTarget` (the
tensor to write: a whole parameter, its FSDP shard, or a segment of it, see
:mod:`leantune.optim.segments`) and a :class:`GradientView`, and writes the new values.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from leantune.optim.collectives import Collectives
from leantune.optim.precision import ROUNDING_MODES, LossScaler, WriteBack
from leantune.optim.segments import LocalSegment, Segment, SegmentState, check_segments, split_segment_key

__all__ = [
    "BackwardResult",
    "FusedOptimizer",
    "GradientView",
    "ParamsLike",
    "UpdateTarget",
    "as_rows",
    "row_chunks",
]

ParamsLike = nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]]

# Largest number of elements processed at once by an update. Bounds the fp32 temporaries of an
# update (gradient copy, squared gradient, bf16->fp32 weight copy) to a few times 16 MiB, however
# large the parameter (a 128k x 4096 embedding would otherwise need 2 GiB per temporary).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class BackwardResult:
    """What one call of ``opt.backward(loss)`` did.

    Attributes:
        updated: the parameters were updated (False while accumulating, or when skipped).
        skipped: the step was skipped because a gradient was inf/nan (e.g. fp16 overflow).
        grad_norm: global L2 norm of the (unscaled, averaged) gradient, when it was measured
            (clipping or dynamic loss scaling), else ``None``.
        loss_scale: the loss scale used for this backward, ``None`` without loss scaling.
        zeroed: without a measuring pass, some parameter's gradient was inf/nan: that parameter
            was not updated (CPU) or updated with a zero gradient (accelerators), the others
            normally, so no weight or optimizer state became NaN; the step should be counted as
            a numerical fault.
    """

    updated: bool
    skipped: bool = False
    grad_norm: float | None = None
    loss_scale: float | None = None
    zeroed: bool = False


@dataclass(frozen=True)
class UpdateTarget:
    """What one update writes: a whole parameter (its local shard under FSDP) or a segment of it.

    Attributes:
        tensor: the tensor to update in place (a view of the parameter, or a gathered copy that
            the engine writes back after the update).
        shape: its global shape, across shards: statistics that span the whole tensor are summed
            over the shards of a tensor of this shape.
        key: a stable key for per-target objects (the parameter, or ``(parameter, segment name)``).
        param: the parameter itself (a DTensor when sharded: its placements tell which statistics
            the collectives sum over which ranks).
    """

    tensor: Tensor
    shape: torch.Size
    key: Any
    param: Tensor | None = None


class _Phase(Enum):
    IDLE = "idle"
    ACCUMULATE = "accumulate"
    MEASURE = "measure"
    UPDATE = "update"


def as_rows(t: Tensor) -> Tensor:
    """View ``t`` as a 2-D ``(rows, cols)`` tensor (vectors become one column)."""
    if t.dim() >= 2:
        return t.view(-1, t.shape[-1])
    return t.view(-1, 1)


def row_chunks(n_rows: int, n_cols: int, max_elements: int) -> Iterator[slice]:
    """Slices of whole rows covering ``n_rows`` with at most ``max_elements`` elements each."""
    step = max(1, max_elements // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


class GradientView:
    """The effective gradient of one parameter, produced chunk by chunk in fp32.

    The effective gradient is ``clip_coef * clamp(grad / loss_scale + accumulated, +-clip_value)``.
    It is never materialised whole: :meth:`chunk` builds it for a range of rows, so the update of
    a huge matrix needs only chunk-sized temporaries.
    """

    __slots__ = ("_grad", "_acc", "inv_scale", "clip_value", "clip_coef", "shape", "numel")

    def __init__(
        self,
        grad: Tensor | None,
        acc: Tensor | None,
        *,
        inv_scale: float = 1.0,
        clip_value: float | None = None,
        clip_coef: float = 1.0,
    ) -> None:
        ref = grad if grad is not None else acc
        if ref is None:
            raise ValueError("GradientView needs a gradient or an accumulation buffer")
        self._grad = as_rows(grad) if grad is not None else None
        self._acc = as_rows(acc) if acc is not None else None
        self.inv_scale = inv_scale
        self.clip_value = clip_value
        self.clip_coef = clip_coef
        self.shape = as_rows(ref).shape

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    def chunks(self, max_elements: int) -> Iterator[slice]:
        return row_chunks(self.shape[0], self.shape[1], max_elements)

    def chunk(self, rows: slice) -> Tensor:
        """The effective gradient for ``rows`` as fp32. Treat it as read-only: it may alias the
        parameter's gradient when no transformation is needed."""
        g = self._grad[rows] if self._grad is not None else None
        plain = (
            self._acc is None and self.inv_scale == 1.0 and self.clip_value is None and self.clip_coef == 1.0
        )
        if plain:
            return g.float()
        if g is None:
            out = self._acc[rows].clone()
        else:
            out = g.to(torch.float32, copy=True)
            if self.inv_scale != 1.0:
                out.mul_(self.inv_scale)
            if self._acc is not None:
                out.add_(self._acc[rows])
        if self.clip_value is not None:
            out.clamp_(-self.clip_value, self.clip_value)
        if self.clip_coef != 1.0:
            out.mul_(self.clip_coef)
        return out

    def full(self) -> Tensor:
        """The whole effective gradient (fp32, shaped like rows x cols)."""
        return self.chunk(slice(None))

    def square_sum(self, max_elements: int) -> Tensor:
        """``sum(g^2)`` of the effective gradient as an fp32 0-d tensor (no host sync)."""
        ref = self._grad if self._grad is not None else self._acc
        total = torch.zeros((), dtype=torch.float32, device=ref.device)
        for rows in self.chunks(max_elements):
            total = total + torch.linalg.vector_norm(self.chunk(rows), 2, dtype=torch.float32).square()
        return total

    def has_nonfinite(self, max_elements: int) -> bool:
        """Whether any element of the effective gradient is inf/nan (a host bool: meant for CPU).

        One read-only ``sum`` per chunk: NaN and inf propagate into it, and a finite gradient
        cannot overflow an fp32 sum unless its elements already exceed ~1e29.
        """
        for rows in self.chunks(max_elements):
            if not math.isfinite(torch.sum(self.chunk(rows), dtype=torch.float32).item()):
                return True
        return False

    def zero_unless_finite(self, max_elements: int) -> Tensor:
        """Zero the gradient in place if any element of the effective gradient is inf/nan.

        Returns a 0-d bool tensor, True when it was zeroed. No host sync: one ``aminmax`` read
        (NaN propagates, inf shows; no overflow as with ``sum(g^2)``) and one write. The
        gradient and accumulation buffer must be owned by the caller.
        """
        ref = self._grad if self._grad is not None else self._acc
        bad = torch.zeros((), dtype=torch.bool, device=ref.device)
        for rows in self.chunks(max_elements):
            lo, hi = torch.aminmax(self.chunk(rows))
            bad |= ~(torch.isfinite(lo) & torch.isfinite(hi))
        keep = (~bad).float()  # x * 1.0 is exact; nan_to_num first, as nan * 0.0 is nan
        for t in (self._grad, self._acc):
            if t is not None:
                t.nan_to_num_(0.0, 0.0, 0.0).mul_(keep)  # ~7x faster than masked_fill_ on CPU
        return bad


def _param_groups(params: ParamsLike) -> list[dict[str, Any]] | list[Any]:
    if isinstance(params, nn.Module):
        named = list(params.named_parameters())
        if not named:
            raise ValueError("the model has no parameters")
        return named
    if isinstance(params, Tensor):
        raise TypeError("params must be a model or an iterable of tensors, not a single tensor")
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    return params


def _refuse_wrappers(params: Any) -> None:
    """Wrappers that reduce gradients themselves would race the in-backward updates."""
    if not isinstance(params, nn.Module):
        return
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(params, DistributedDataParallel):
        raise ValueError(
            "a fused optimizer cannot run inside DistributedDataParallel: its hooks update each "
            "parameter as soon as its gradient is complete, possibly before DDP has averaged it over "
            "the ranks. Build the optimizer on the model itself (ddp.module) with "
            "collectives='replicated', which averages each gradient inside its hook, and do not wrap "
            "the model in DDP; or shard it with torch.distributed.fsdp.fully_shard (FSDP2)"
        )
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if isinstance(params, FullyShardedDataParallel) or any(
        getattr(p, "_is_flat_param", False) for p in params.parameters()
    ):
        raise ValueError(
            "a fused optimizer cannot update FSDP1 (FullyShardedDataParallel) flat parameters: shard "
            "the model with FSDP2 instead (torch.distributed.fsdp.fully_shard on each block and the "
            "root); the optimizer then finds the shards itself"
        )


def check_lr_and_weight_decay(lr: float, weight_decay: float) -> None:
    """The torch.optim checks (and messages) for the two hyperparameters every fused update has."""
    for name, value in (("learning rate", lr), ("weight_decay value", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
            raise ValueError(f"Invalid {name}: {value!r} (must be >= 0)")


def _check_positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"Invalid {name}: {value!r} (must be a number > 0{' or None' if allow_none else ''})"
        )


class FusedOptimizer(torch.optim.Optimizer):
    """Base class of the optimizers that update parameters inside ``backward()``.

    Use ``opt.backward(loss)`` instead of ``loss.backward(); opt.step()``. ``step()`` is a no-op
    kept so that LR schedulers and step hooks work unchanged.

    Args:
        params: a model (``nn.Module``), or an iterable of tensors, of ``(name, tensor)`` pairs or
            of param-group dicts. Parameters with ``requires_grad=False`` are kept in the groups (so
            indices stay stable) but get no hook and no state.
        defaults: per-group hyperparameters (must include ``lr`` and ``weight_decay``).
        clip_grad_norm: exact global gradient-norm clipping threshold (costs a second backward).
        clip_grad_value: clamp every gradient element to ``[-v, v]`` (free).
        loss_scale: ``None``, a static scale, ``"dynamic"`` or a :class:`LossScaler`; for fp16.
            Dynamic scaling implies the measuring backward pass (overflow is detected before any
            weight changes).
        accumulation_steps: number of ``opt.backward`` calls per update; the update uses the mean
            of their gradients (each call's loss should be that micro-batch's mean loss).
        rounding: how fp32 results are written to bf16/fp16 weights: ``"nearest"``,
            ``"stochastic"`` or ``"kahan"`` (see :mod:`leantune.optim.precision`).
        seed: seed of the stochastic-rounding generator (saved in ``state_dict``).
        collectives: how updates talk to other ranks. ``"auto"`` (default) reads the context:
            FSDP2 shards (DTensor parameters) get the sharded collectives, so that statistics
            spanning a tensor and the clipping norm are those of the whole tensor; one process gets
            none; a model wrapped in ``DistributedDataParallel`` or FSDP1 is refused (the hooks
            would race the wrapper's gradient reduction), and plain parameters in a job of several
            ranks are refused at the first backward until one of these is chosen: ``"replicated"``
            (average each gradient over the ranks inside its hook: data parallelism without DDP),
            ``"local"`` (each rank trains on its own), ``"sharded"``, or a
            :class:`~leantune.optim.collectives.Collectives` instance.
    """

    def __init__(
        self,
        params: ParamsLike,
        defaults: dict[str, Any],
        *,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float | str | LossScaler | None = None,
        accumulation_steps: int = 1,
        rounding: str = "nearest",
        seed: int = 0,
        collectives: str | Collectives = "auto",
    ) -> None:
        _check_positive("clip_grad_norm", clip_grad_norm)
        _check_positive("clip_grad_value", clip_grad_value)
        if (
            isinstance(accumulation_steps, bool)
            or not isinstance(accumulation_steps, int)
            or accumulation_steps < 1
        ):
            raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} (must be an int >= 1)")
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"Invalid rounding: {rounding!r} (choose from {', '.join(ROUNDING_MODES)})")
        _refuse_wrappers(params)
        super().__init__(_param_groups(params), defaults)
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.loss_scaler = LossScaler.from_spec(loss_scale)
        self.accumulation_steps = accumulation_steps
        self.rounding = rounding
        self.seed = int(seed)
        self.chunk_elements = DEFAULT_CHUNK_ELEMENTS
        self.writer = WriteBack(rounding, self._generator, lambda: self.seed + self.collectives.seed_offset())
        self._collectives: Collectives = Collectives()
        self._context_checked = False
        self.collectives = collectives
        self._generators: dict[str, torch.Generator] = {}
        self._micro_step = 0
        self._phase = _Phase.IDLE
        self._inv_scale = 1.0
        self._clip_coef = 1.0
        self._square_sums: dict[torch.device, Tensor] = {}
        self._guard = False  # zero non-finite gradients before updating (no measuring pass)
        self._zeroed: dict[torch.device, Tensor] = {}
        self._seen: set[int] = set()
        self._hooks: dict[Tensor, Any] = {}
        self._segments: dict[Tensor, tuple[Segment, ...]] = {}
        self._local_segments: dict[Tensor, list[LocalSegment]] = {}
        self.refresh_hooks()

    # -------------------------------------------------------------- scale-out
    @property
    def collectives(self) -> Collectives:
        """How updates talk to other ranks (see the ``collectives`` argument)."""
        return self._collectives

    @collectives.setter
    def collectives(self, value: str | Collectives) -> None:
        if isinstance(value, Collectives):
            self._collectives, self._context_checked = value, True
        elif value == "auto":
            from leantune.distributed.collectives import detect_collectives

            found = detect_collectives(p for p, _ in self._params())
            self._collectives = found if found is not None else Collectives()
            # plain tensors: one process, or a multi-rank job that must say what it wants
            self._context_checked = found is not None
        else:
            from leantune.distributed.collectives import named_collectives

            self._collectives, self._context_checked = named_collectives(value), True
        if getattr(self, "_generators", None):
            self._generators.clear()  # their seeds depend on the rank's offset
        self._check_collectives()

    def _check_collectives(self) -> None:
        """Subclasses: refuse collectives their update cannot honour (raise ``ValueError``)."""

    def _check_context(self) -> None:
        """At the first backward: the context the optimizer was built in may have changed."""
        self._context_checked = True
        from leantune.distributed.collectives import detect_collectives, world_size

        found = detect_collectives(p for p, _ in self._params())
        if found is not None:
            self._collectives = found
            self._check_collectives()
        elif world_size() > 1:
            raise RuntimeError(
                f"{type(self).__name__}: this process is one of {world_size()} ranks and the parameters "
                "are plain (replicated) tensors, so each rank would update its own copy. Choose: "
                "collectives='replicated' to average every gradient over the ranks inside its hook "
                "(data parallelism: do not also wrap the model in DistributedDataParallel), or "
                "collectives='local' to train each rank on its own; or shard the model with "
                "torch.distributed.fsdp.fully_shard before building the optimizer"
            )

    # ------------------------------------------------------------------ hooks
    def _params(self) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        for group in self.param_groups:
            for p in group["params"]:
                yield p, group

    def refresh_hooks(self) -> None:
        """(Re)register hooks so that exactly the parameters with ``requires_grad`` have one.

        Call it after changing which parameters are trainable (e.g. a new HFT mask).
        """
        self._index_groups()
        for p, _ in self._params():
            hooked = p in self._hooks
            if p.requires_grad and not hooked:
                owner = getattr(p, "_leantune_owner", None)
                if owner is not None and owner() is not None and owner() is not self:
                    raise ValueError(
                        "a parameter is already managed by another fused optimizer; call "
                        "remove_hooks() on the old optimizer before creating a new one"
                    )
                self._hooks[p] = p.register_post_accumulate_grad_hook(_make_hook(self))
                p._leantune_owner = weakref.ref(self)
            elif not p.requires_grad and hooked:
                self._hooks.pop(p).remove()
                p._leantune_owner = None
                self.state.pop(p, None)

    def _index_groups(self) -> None:
        # torch replaces the group dicts in load_state_dict: this map must follow, or the hooks
        # would read a stale lr that no scheduler updates any more.
        self._group_of = {p: g for p, g in self._params()}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_hooks"):
            self.refresh_hooks()

    def remove_hooks(self) -> None:
        """Detach the optimizer from its parameters (plain ``loss.backward()`` works again)."""
        for p, handle in self._hooks.items():
            handle.remove()
            p._leantune_owner = None
        self._hooks.clear()

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters that have a hook (``requires_grad=True``)."""
        return list(self._hooks)

    def set_segments(self, segments: dict[str | Tensor, Any]) -> None:
        """Update only these parts of some parameters, each as a tensor of its own.

        Args:
            segments: parameter (or its name, as in ``model.named_parameters()``) -> a sequence of
                :class:`~leantune.optim.segments.Segment`, the parts of it that train; an empty
                sequence or ``None`` makes the whole tensor train again. Parameters not named keep
                their current setting.

        State of a segment is kept when a segment of the same name and indices is given again; a
        parameter whose segments change otherwise starts its (other) segments from zero state, as
        a first update would.

        Raises:
            ValueError: an unknown parameter name, or segments that overlap or do not fit.
        """
        by_name: dict[str, Tensor] = {}
        for group in self.param_groups:
            for name, p in zip(group.get("param_names", []), group["params"]):
                by_name[name] = p
        ids = {id(p) for p, _ in self._params()}
        for key, segs in segments.items():
            if isinstance(key, str):
                if key not in by_name:
                    raise ValueError(f"set_segments: no parameter named {key!r} in this optimizer")
                p = by_name[key]
            elif id(key) in ids:
                p = key
            else:
                raise ValueError("set_segments: a parameter that this optimizer does not hold")
            new = tuple(segs or ())
            if new:
                check_segments(new, p.shape)
            old = self._segments.get(p, ())
            if new == old:
                continue
            state = self.state.get(p)
            if state:
                kept = {s.name for s in new} & {s.name for s in old if s in new}
                for k in list(state):
                    seg, _ = split_segment_key(k) if isinstance(k, str) else (None, k)
                    if seg is None or seg not in kept:
                        del state[k]
            if new:
                self._segments[p] = new
            else:
                self._segments.pop(p, None)
            self._local_segments.pop(p, None)

    def segments(self, p: Tensor) -> tuple[Segment, ...]:
        """The segments of ``p`` (empty: the whole tensor trains)."""
        return self._segments.get(p, ())

    def _local_segs(self, p: Tensor) -> list[LocalSegment] | None:
        segs = self._segments.get(p)
        if segs is None:
            return None
        local = self._local_segments.get(p)
        if local is None:
            local = [LocalSegment(s, p) for s in segs]
            self._local_segments[p] = local
        return local

    def _targets(self, p: Tensor) -> Iterator[tuple[LocalSegment | None, dict[str, Any] | SegmentState]]:
        """(segment, its state) for each part of ``p`` that is updated on its own."""
        local = self._local_segs(p)
        if local is None:
            yield None, self.state[p]
            return
        state = self.state[p]
        for seg in local:
            yield seg, SegmentState(state, seg.segment.name)

    def _target(self, p: Tensor, seg: LocalSegment | None) -> UpdateTarget:
        local = self._local(p)
        if seg is None:
            return UpdateTarget(local, p.shape, p, p)
        return UpdateTarget(seg.read(local), seg.global_shape, (p, seg.segment.name), p)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + self.collectives.seed_offset())
            self._generators[key] = gen
        return gen

    # --------------------------------------------------------------- backward
    @contextmanager
    def _in_phase(self, phase: _Phase) -> Iterator[None]:
        self._phase = phase
        try:
            yield
        finally:
            self._phase = _Phase.IDLE

    def _on_grad(self, p: Tensor) -> None:
        if self._phase is _Phase.IDLE:
            raise RuntimeError(
                f"{type(self).__name__}: a gradient arrived outside opt.backward(loss). Fused "
                "optimizers update inside backward: call opt.backward(loss) instead of "
                "loss.backward(), or opt.remove_hooks() to detach the optimizer."
            )
        full = self._local(p.grad)
        p.grad = None  # the gradient is ours now and dies with this call
        if full is None:
            return
        if self._phase is not _Phase.ACCUMULATE:
            self._seen.add(id(p))
        for seg, state in self._targets(p):
            grad = full if seg is None else seg.read(full)
            self._on_target(p, seg, grad, state)
            del grad

    def _on_target(
        self, p: Tensor, seg: LocalSegment | None, grad: Tensor, state: dict[str, Any] | SegmentState
    ) -> None:
        if self._phase is _Phase.ACCUMULATE:
            # Micro-batches accumulate locally; ranks are synchronised once, at the update.
            acc = state.get("grad_acc")
            if acc is None:
                state["grad_acc"] = grad.to(torch.float32, copy=True).mul_(self._inv_scale)
            else:
                acc.add_(grad, alpha=self._inv_scale)
            return
        measuring = self._phase is _Phase.MEASURE
        acc = state.get("grad_acc") if measuring else state.pop("grad_acc", None)
        view = self._view(grad, acc, clip_coef=1.0 if measuring else self._clip_coef)
        del grad, acc
        if measuring:
            self._add_square_sum(view.square_sum(self.chunk_elements), p)
            return
        self._apply(p, seg, view, state)

    def _apply(
        self, p: Tensor, seg: LocalSegment | None, view: GradientView, state: dict[str, Any] | SegmentState
    ) -> None:
        """Update ``p``. Without a measuring pass nothing has checked the gradient yet. On the CPU,
        where reading a flag costs nothing, a parameter whose gradient holds an inf/nan is not
        updated at all (one read-only pass over the gradient); on accelerators, where a per-tensor
        host sync would stall the device, that gradient is zeroed on the device instead (also on the
        CPU when the tensor is sharded: every shard must take part in the update's collectives).
        Either way the step is flagged (``BackwardResult.zeroed``)."""
        with torch.no_grad():
            if self._guard:
                local = self._local(p)
                # A rank may skip a tensor on its own only when no shard collective follows.
                if local.device.type == "cpu" and not self.collectives.sharded:
                    if view.has_nonfinite(self.chunk_elements):
                        self._zeroed[local.device] = torch.ones((), dtype=torch.bool)
                        return
                else:
                    bad = view.zero_unless_finite(self.chunk_elements)
                    current = self._zeroed.get(bad.device)
                    self._zeroed[bad.device] = bad if current is None else current | bad
            target = self._target(p, seg)
            self._update(target, view, self._group_of[p], state)
            if seg is not None:
                seg.write(self._local(p), target.tensor)

    def _any_zeroed(self) -> bool:
        """Whether any rank zeroed a non-finite gradient this step (the one host sync per step)."""
        flags = list(self._zeroed.values())
        self._zeroed.clear()
        total = self._scalar_zero() if not flags else flags[0].float()
        for f in flags[1:]:
            total = total + f.float().to(total.device)
        return self.collectives.sum_square_norms(total).item() > 0

    def _view(self, grad: Tensor | None, acc: Tensor | None, *, clip_coef: float) -> GradientView:
        """The effective gradient; for replicated data parallelism, averaged over the ranks."""
        inv_scale = self._inv_scale if grad is not None else 1.0
        if self.collectives.replicated:
            total = acc.clone() if grad is None else grad.to(torch.float32, copy=True).mul_(inv_scale)
            if grad is not None and acc is not None:
                total.add_(acc)
            grad, acc, inv_scale = self.collectives.average_gradient(total), None, 1.0
        return GradientView(
            grad, acc, inv_scale=inv_scale, clip_value=self.clip_grad_value, clip_coef=clip_coef
        )

    def _add_square_sum(self, sq: Tensor, p: Tensor) -> None:
        share = self.collectives.norm_share(p)
        if share != 1.0:
            sq = sq * share
        current = self._square_sums.get(sq.device)
        self._square_sums[sq.device] = sq if current is None else current + sq

    def _unseen_accumulated(self) -> list[tuple[Tensor, LocalSegment | None, Any]]:
        # Parts of parameters that received gradients in earlier micro-batches but not in this one.
        out = []
        for p in self._hooks:
            if id(p) in self._seen or not self.state.get(p):
                continue
            out.extend((p, seg, state) for seg, state in self._targets(p) if "grad_acc" in state)
        return out

    def _scalar_zero(self) -> Tensor:
        """A float32 zero on the parameters' device: what a rank with nothing to add sends to a
        collective (NCCL takes device tensors only)."""
        first = next(iter(self._hooks), None)
        return torch.zeros((), dtype=torch.float32, device=first.device if first is not None else None)

    def _global_square_sum(self) -> Tensor:
        sums = list(self._square_sums.values())
        if not sums:
            # Still a collective: the other ranks enter it whether or not this one has gradients.
            return self.collectives.sum_square_norms(self._scalar_zero())
        total = sums[0]
        for s in sums[1:]:
            total = total + s.to(total.device)
        return self.collectives.sum_square_norms(total)

    def backward(self, loss: Tensor, *, retain_graph: bool = False) -> BackwardResult:
        """Run backward on ``loss`` and apply the fused update (every ``accumulation_steps`` calls).

        Args:
            loss: a scalar loss (the mean over this micro-batch).
            retain_graph: keep the graph after the last backward pass.

        Returns:
            A :class:`BackwardResult`.
        """
        if self._phase is not _Phase.IDLE:
            raise RuntimeError("opt.backward() is not re-entrant")
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        if not self._context_checked:
            self._check_context()
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        scale_reported = self.loss_scaler.scale if self.loss_scaler is not None else None
        factor = scale / self.accumulation_steps
        scaled = loss * factor if factor != 1.0 else loss
        self._inv_scale = 1.0 / scale
        self._micro_step += 1
        if self._micro_step < self.accumulation_steps:
            with self._in_phase(_Phase.ACCUMULATE):
                scaled.backward(retain_graph=retain_graph)
            return BackwardResult(updated=False, loss_scale=scale_reported)

        self._micro_step = 0
        self._seen.clear()
        grad_norm = None
        self._clip_coef = 1.0
        measure = self.clip_grad_norm is not None or (
            self.loss_scaler is not None and self.loss_scaler.dynamic
        )
        if measure:
            self._square_sums.clear()
            with self._in_phase(_Phase.MEASURE):
                scaled.backward(retain_graph=True)
            grad_norm, skipped = self._finish_measure(self._unseen_accumulated(), scale_reported)
            if skipped is not None:
                return skipped
            self._seen.clear()
        self._guard, self._zeroed = not measure, {}
        try:
            with self._in_phase(_Phase.UPDATE):
                scaled.backward(retain_graph=retain_graph)
                for p, seg, state in self._unseen_accumulated():
                    view = self._view(None, state.pop("grad_acc"), clip_coef=self._clip_coef)
                    self._apply(p, seg, view, state)
        finally:
            self._guard = False
        zeroed = not measure and self._any_zeroed()
        if not self._seen and self._hooks:
            raise RuntimeError(
                f"{type(self).__name__}: none of its {len(self._hooks)} trainable parameters received a "
                "gradient in this backward. Was the model wrapped or sharded (fully_shard, peft, ...) "
                "after the optimizer was built? Those replace the parameters: build the optimizer on "
                "the wrapped model."
            )
        self._seen.clear()
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow=False)
        self.step()  # a no-op that tells LR schedulers and step hooks that an update happened
        return BackwardResult(updated=True, grad_norm=grad_norm, loss_scale=scale_reported, zeroed=zeroed)

    def _finish_measure(
        self, accumulated: list[tuple[Tensor, Any, Any]], scale_reported: float | None
    ) -> tuple[float, BackwardResult | None]:
        """After a measuring pass: add the accumulated buffers' ``sum(g^2)``, take the global norm
        (the one host sync per step) and set the clip coefficient; on overflow drop the step, and
        return its result as the second value."""
        for p, _, state in accumulated:
            view = self._view(None, state["grad_acc"], clip_coef=1.0)
            self._add_square_sum(view.square_sum(self.chunk_elements), p)
        grad_norm = math.sqrt(self._global_square_sum().item())
        self._square_sums.clear()
        if not math.isfinite(grad_norm):
            self._drop_accumulation()
            if self.loss_scaler is not None:
                self.loss_scaler.update(overflow=True)
            return grad_norm, BackwardResult(
                updated=False, skipped=True, grad_norm=grad_norm, loss_scale=scale_reported
            )
        if self.clip_grad_norm is not None:
            self._clip_coef = min(1.0, self.clip_grad_norm / (grad_norm + 1e-6))
        return grad_norm, None

    def begin_micro_batches(self, n: int) -> float:
        """Let another driver run the backward passes of ``n`` micro-batches, for one update.

        For schedules that call backward themselves, e.g. a ``torch.distributed.pipelining``
        schedule on a pipeline stage: between this call and :meth:`end_micro_batches`, each
        gradient that arrives is added to the parameter's fp32 accumulation buffer, divided by
        ``n`` and by the loss scale, so the buffers end up holding the mean gradient (4 bytes per
        trainable parameter while they exist, as with ``accumulation_steps``).

        Returns:
            The factor every micro-batch loss must be multiplied by before its backward: the
            current loss scale (1.0 without loss scaling).

        Raises:
            RuntimeError: inside another backward, or with ``opt.backward`` micro-batches pending.
            ValueError: ``n`` is not an int >= 1.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Invalid number of micro-batches: {n!r} (must be an int >= 1)")
        if self._phase is not _Phase.IDLE:
            raise RuntimeError(
                "begin_micro_batches() inside a backward or an unfinished begin_micro_batches()"
            )
        if self._micro_step:
            raise RuntimeError(
                f"{self._micro_step} opt.backward() micro-batches of accumulation_steps="
                f"{self.accumulation_steps} are pending; finish that step first"
            )
        if not self._context_checked:
            self._check_context()
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        self._inv_scale = 1.0 / (scale * n)
        self._seen.clear()
        self._phase = _Phase.ACCUMULATE
        return scale

    def abort_micro_batches(self) -> None:
        """Leave :meth:`begin_micro_batches` without an update (the driver failed mid-way): the
        partial accumulation is dropped, as ``zero_grad`` does, and the optimizer is idle again."""
        if self._phase is not _Phase.ACCUMULATE or self._micro_step:
            raise RuntimeError("abort_micro_batches() without begin_micro_batches()")
        self._phase = _Phase.IDLE
        self._seen.clear()
        for p, _ in self._params():
            p.grad = None
        self._drop_accumulation()

    def end_micro_batches(self) -> BackwardResult:
        """Apply the update of the micro-batches since :meth:`begin_micro_batches`.

        With clipping or dynamic loss scaling, the norm of the accumulated mean gradient is
        measured first and summed over the ranks by the collectives (over the shards, and over the
        pipeline stages when the collectives span them), so every stage clips by the same
        coefficient and skips the same overflowing step. Every rank of the job must call it.
        """
        if self._phase is not _Phase.ACCUMULATE or self._micro_step:
            raise RuntimeError("end_micro_batches() without begin_micro_batches()")
        self._phase = _Phase.IDLE
        scale_reported = self.loss_scaler.scale if self.loss_scaler is not None else None
        self._seen.clear()
        pending = self._unseen_accumulated()
        grad_norm, self._clip_coef = None, 1.0
        measure = self.clip_grad_norm is not None or (
            self.loss_scaler is not None and self.loss_scaler.dynamic
        )
        if measure:
            self._square_sums.clear()
            grad_norm, skipped = self._finish_measure(pending, scale_reported)
            if skipped is not None:
                return skipped
        self._guard, self._zeroed = not measure, {}
        try:
            for p, seg, state in pending:
                view = self._view(None, state.pop("grad_acc"), clip_coef=self._clip_coef)
                self._apply(p, seg, view, state)
        finally:
            self._guard = False
        zeroed = not measure and self._any_zeroed()
        if not pending and self._hooks:
            raise RuntimeError(
                f"{type(self).__name__}: none of its {len(self._hooks)} trainable parameters received a "
                "gradient between begin_micro_batches() and end_micro_batches()"
            )
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow=False)
        self.step()
        return BackwardResult(updated=True, grad_norm=grad_norm, loss_scale=scale_reported, zeroed=zeroed)

    def _drop_accumulation(self) -> None:
        for p in self._hooks:
            st = self.state.get(p)
            if st:
                for k in [k for k in st if isinstance(k, str) and split_segment_key(k)[1] == "grad_acc"]:
                    del st[k]

    # ------------------------------------------------- torch.optim interface
    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D401 - torch API
        """Does nothing: the update already happened inside ``opt.backward(loss)``."""
        if closure is not None:
            raise RuntimeError(
                f"{type(self).__name__}.step() takes no closure: updates happen inside opt.backward(loss)"
            )
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop any gradients and a partially accumulated step (the micro-step counter restarts)."""
        for p, _ in self._params():
            p.grad = None
        self._drop_accumulation()
        self._micro_step = 0

    def state_dict(self) -> dict[str, Any]:
        """The torch state dict plus the engine's own state under ``"leantune"``.

        Includes per-parameter state (e.g. AdaLomo statistics and step counts, accumulation
        buffers of a partial step), the micro-step counter, the loss-scaler state and the
        stochastic-rounding generator states.
        """
        sd = super().state_dict()
        params = [p for p, _ in self._params()]
        sd["state"] = {
            pid: {
                k: self.collectives.export_state(params[pid], k, v, self._segment_of(params[pid], k))
                for k, v in st.items()
            }
            for pid, st in sd["state"].items()
        }
        sd["leantune"] = self.engine_state_dict()
        return sd

    def engine_state_dict(self) -> dict[str, Any]:
        """The engine's own state (micro-step counter, loss scaler, rounding generators)."""
        return {
            "micro_step": self._micro_step,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "generators": {dev: gen.get_state() for dev, gen in self._generators.items()},
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict`; tensors keep their saved dtype."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("leantune", None)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for p, _ in self._params()]
        super().load_state_dict(state_dict)
        self._index_groups()
        # torch casts floating state to the parameter's dtype; our statistics and accumulation
        # buffers are fp32 by design, so restore the saved dtype.
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    local = self.collectives.import_state(p, key, value, self._segment_of(p, key))
                    self.state[p][key] = local.to(device=self._local(p).device, copy=True)
        if extra is not None:
            self.load_engine_state_dict(extra)
        self._after_load()

    def load_engine_state_dict(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`engine_state_dict` returned."""
        self._micro_step = int(extra["micro_step"])
        self.seed = int(extra.get("seed", self.seed))
        if extra["loss_scaler"] is not None:
            if self.loss_scaler is None:
                self.loss_scaler = LossScaler()
            self.loss_scaler.load_state_dict(extra["loss_scaler"])
        self._generators.clear()
        for dev, gen_state in extra["generators"].items():
            self._generator(torch.device(dev)).set_state(gen_state)

    def _segment_of(self, p: Tensor, key: Any) -> LocalSegment | None:
        name = split_segment_key(key)[0] if isinstance(key, str) else None
        if name is None:
            return None
        for seg in self._local_segs(p) or ():
            if seg.segment.name == name:
                return seg
        raise KeyError(f"optimizer state {key!r} names a segment this parameter does not have")

    def init_state(self) -> None:
        """Create the (zero) state of every trainable parameter now instead of at its first update.

        The values equal what the first update would start from; checkpoint loaders such as
        ``torch.distributed.checkpoint`` need the state's structure before they can fill it.
        """
        for p in self._hooks:
            for seg, state in self._targets(p):
                if not state:
                    target = self._target(p, seg)
                    self._compensation(target.tensor, state)
                    self._init_param_state(target, state)

    def _init_param_state(self, target: UpdateTarget, state: dict[str, Any]) -> None:
        """Subclasses: create the zero state of ``target`` (see :meth:`init_state`)."""

    def _after_load(self) -> None:
        """Hook for subclasses that keep references into ``self.state``."""

    # ------------------------------------------------- for subclasses / scale-out
    def _local(self, t: Tensor | None) -> Tensor | None:
        """The local tensor of a (possibly sharded) tensor."""
        if t is not None and hasattr(t, "to_local"):
            return t.to_local()
        return t

    def _compensation(self, local: Tensor, state: dict[str, Any]) -> Tensor | None:
        """The Kahan buffer of the (local) tensor being updated (created on first use), or ``None``
        if not needed."""
        if not self.writer.needs_compensation(local):
            return None
        comp = state.get("kahan")
        if comp is None:
            comp = torch.zeros_like(local)
            state["kahan"] = comp
        return comp

    def _update(
        self, target: UpdateTarget, grad: GradientView, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Subclasses: update ``target.tensor`` in place from ``grad``."""
        raise NotImplementedError


def _make_hook(opt: FusedOptimizer):
    # A weak reference, so that a dropped optimizer does not keep updating through its hooks.
    ref = weakref.ref(opt)

    def hook(p: Tensor) -> None:
        owner = ref()
        if owner is not None:
            owner._on_grad(p)

    return hook
