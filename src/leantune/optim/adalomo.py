"""AdaLomo: LOMO with an adaptive, factored learning rate (Lv et al., 2023, arXiv 2310.10195)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from leantune.optim.engine import FusedOptimizer, GradientView, ParamsLike, as_rows
from leantune.optim.precision import LossScaler, WriteBack

__all__ = ["AdaLomo", "adalomo_update"]


def _identity(t: Tensor) -> Tensor:
    return t


def adalomo_update(
    param: Tensor,
    grad: GradientView,
    state: dict[str, Any],
    *,
    lr: float,
    weight_decay: float,
    eps: tuple[float, float],
    decay_rate: float,
    clip_threshold: float,
    writer: WriteBack,
    compensation: Tensor | None = None,
    chunk_elements: int,
    shard_sum: Callable[[Tensor], Tensor] = _identity,
    global_shape: torch.Size | None = None,
) -> None:
    """Apply one AdaLomo step to ``param`` in place and update ``state``.

    ``param`` may be the local shard (rows ``[r0, r1)``) of a larger tensor of ``global_shape``;
    ``shard_sum`` then sums partial statistics over the shards in place, so that row/column
    statistics and RMS values are those of the full tensor.

    State: ``step`` (int), and ``row`` (rows,) + ``col`` (cols,) fp32 for tensors with >= 2
    dimensions, or ``v`` (fp32, like the parameter) for vectors.
    """
    eps1, eps2 = eps
    shape = global_shape if global_shape is not None else param.shape
    numel = math.prod(shape)
    rows = as_rows(param)
    comp_rows = as_rows(compensation) if compensation is not None else None
    device = param.device
    state["step"] = state.get("step", 0) + 1
    rho = 1.0 - math.pow(state["step"], decay_rate)  # rho_1 = 0: no bias correction needed

    factored = len(shape) >= 2
    chunks = list(grad.chunks(chunk_elements)) if factored else [slice(None)]
    if factored:
        n_rows = numel // shape[-1]
        if "row" not in state:
            state["row"] = torch.zeros(rows.shape[0], dtype=torch.float32, device=device)
            state["col"] = torch.zeros(rows.shape[1], dtype=torch.float32, device=device)
        row_stat, col_stat = state["row"], state["col"]
        new_row = torch.empty_like(row_stat)
        col_sum = torch.zeros_like(col_stat)
        for sl in chunks:
            sq = grad.chunk(sl).square().add_(eps1)  # G = g^2 + eps1
            new_row[sl] = sq.mean(dim=1)
            col_sum.add_(sq.sum(dim=0))
            del sq
        col_mean = shard_sum(col_sum).div_(n_rows)
        row_stat.mul_(rho).add_(new_row, alpha=1.0 - rho)
        col_stat.mul_(rho).add_(col_mean, alpha=1.0 - rho)
        row_mean = shard_sum(row_stat.sum()) / n_rows
        row_factor = (row_stat / row_mean).rsqrt_().unsqueeze(1)  # (rows, 1)
        col_factor = col_stat.rsqrt().unsqueeze(0)  # (1, cols)

        def scaled(sl: slice) -> Tensor:
            return grad.chunk(sl).mul(row_factor[sl]).mul_(col_factor)
    else:
        if "v" not in state:
            state["v"] = torch.zeros(param.shape, dtype=torch.float32, device=device)
        v = as_rows(state["v"])
        g = grad.full()
        v.mul_(rho).add_(g.square().add_(eps1), alpha=1.0 - rho)
        inv_sqrt_v = v.rsqrt()

        def scaled(sl: slice) -> Tensor:
            return grad.chunk(sl).mul(inv_sqrt_v[sl])

    # RMS of the normalised update and of the parameter (before the update), full-tensor values.
    cached = None
    sums = torch.zeros(2, dtype=torch.float32, device=device)
    for sl in chunks:
        u = scaled(sl)
        sums[0] += torch.linalg.vector_norm(u, 2, dtype=torch.float32).square()
        sums[1] += torch.linalg.vector_norm(rows[sl], 2, dtype=torch.float32).square()
        if len(chunks) == 1:
            cached = u  # one chunk: reuse instead of recomputing
        del u
    rms_u, rms_p = shard_sum(sums).div_(numel).sqrt_()
    denom = torch.clamp(rms_u / clip_threshold, min=1.0)
    eta = torch.clamp(rms_p, min=eps2) * lr
    step_size = eta / denom
    decay = 1.0 - eta * weight_decay

    for sl in chunks:
        u = cached if cached is not None else scaled(sl)
        u.mul_(step_size)

        def step(w: Tensor, u: Tensor = u) -> None:
            if weight_decay != 0.0:
                w.mul_(decay)
            w.sub_(u)

        writer.apply(rows[sl], step, comp_rows[sl] if comp_rows is not None else None)
        del u


class AdaLomo(FusedOptimizer):
    r"""AdaLomo: LOMO with a factored second moment and grouped update normalisation.

    Per parameter tensor, step :math:`t = 1, 2, \dots`, effective gradient :math:`g`:

    .. math::
        \rho_t &= 1 - t^{c} \qquad (c = \text{decay\_rate} = -0.8,\ \rho_1 = 0) \\
        G &= g \odot g + \epsilon_1 \\
        r &\leftarrow \rho_t r + (1-\rho_t)\,\mathrm{mean}_{cols}(G), \quad
        c \leftarrow \rho_t c + (1-\rho_t)\,\mathrm{mean}_{rows}(G) \\
        u &= g \,/\, \sqrt{(r / \mathrm{mean}(r))\, c^\top}
            \qquad (\text{vectors: } v \leftarrow \rho_t v + (1-\rho_t) G,\ u = g/\sqrt{v}) \\
        u &\leftarrow u \,/\, \max(1, \mathrm{RMS}(u) / d) \qquad (d = \text{clip\_threshold}) \\
        \eta &= \text{lr} \cdot \max(\epsilon_2, \mathrm{RMS}(p)) \\
        p &\leftarrow p\,(1 - \eta\lambda) - \eta\, u

    This is exactly ``transformers.optimization.Adafactor(beta1=None, scale_parameter=True,
    relative_step=False, warmup_init=False)`` with the same ``eps``, ``clip_threshold`` and
    ``decay_rate``, applied inside backward. State per ``n x m`` matrix: ``n + m`` fp32 numbers.

    Note:
        Tensors with more than two dimensions are factored as ``(prod(shape[:-1]), shape[-1])``
        matrices, whereas Adafactor factors them as a batch of matrices over the last two
        dimensions. LLM parameters are matrices and vectors, where both agree.

    Memory and cost: as :class:`~leantune.optim.LOMO` (one parameter's gradient at a time; an fp32
    accumulation buffer only while accumulating; ``clip_grad_norm`` costs an extra backward). The
    grouped normalisation already bounds the update, so gradient-norm clipping is rarely needed.

    Args:
        params: a model or an iterable of parameters / ``(name, parameter)`` pairs / param groups.
        lr: relative step size (paper: 1e-3; 5e-4 for instruction tuning).
        weight_decay: decoupled weight decay, scaled by the step size :math:`\eta`.
        eps: ``(eps1, eps2)``: added to squared gradients; floor of the parameter RMS.
        decay_rate: exponent :math:`c < 0` of the second-moment decay.
        clip_threshold: threshold :math:`d > 0` of the update RMS.
        clip_grad_norm, clip_grad_value, loss_scale, accumulation_steps, rounding, seed: see
            :class:`~leantune.optim.engine.FusedOptimizer`.
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        eps: tuple[float, float] = (1e-30, 1e-3),
        decay_rate: float = -0.8,
        clip_threshold: float = 1.0,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float | str | LossScaler | None = None,
        accumulation_steps: int = 1,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr!r} (must be >= 0)")
        if (
            isinstance(weight_decay, bool)
            or not isinstance(weight_decay, (int, float))
            or not weight_decay >= 0.0
        ):
            raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (must be >= 0)")
        if (
            not isinstance(eps, (tuple, list))
            or len(eps) != 2
            or not all(isinstance(e, (int, float)) and e > 0 for e in eps)
        ):
            raise ValueError(f"Invalid eps: {eps!r} (must be two numbers > 0: (eps1, eps2))")
        if not isinstance(decay_rate, (int, float)) or not decay_rate < 0.0:
            raise ValueError(f"Invalid decay_rate: {decay_rate!r} (must be < 0, e.g. -0.8)")
        if not isinstance(clip_threshold, (int, float)) or not clip_threshold > 0.0:
            raise ValueError(f"Invalid clip_threshold: {clip_threshold!r} (must be > 0)")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "eps": tuple(eps),
            "decay_rate": decay_rate,
            "clip_threshold": clip_threshold,
        }
        super().__init__(
            params,
            defaults,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            loss_scale=loss_scale,
            accumulation_steps=accumulation_steps,
            rounding=rounding,
            seed=seed,
        )

    def _update(self, p: Tensor, grad: GradientView, group: dict[str, Any], state: dict[str, Any]) -> None:
        adalomo_update(
            self._local(p),
            grad,
            state,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            decay_rate=group["decay_rate"],
            clip_threshold=group["clip_threshold"],
            writer=self.writer,
            compensation=self._compensation(p, state),
            chunk_elements=self.chunk_elements,
            shard_sum=lambda t: self.collectives.shard_sum(p, t),
            global_shape=p.shape,
        )

    def _init_param_state(self, p: Tensor, state: dict[str, Any]) -> None:
        local = as_rows(self._local(p))
        state["step"] = 0
        if p.dim() >= 2:
            state["row"] = torch.zeros(local.shape[0], dtype=torch.float32, device=local.device)
            state["col"] = torch.zeros(local.shape[1], dtype=torch.float32, device=local.device)
        else:
            state["v"] = torch.zeros(self._local(p).shape, dtype=torch.float32, device=local.device)
