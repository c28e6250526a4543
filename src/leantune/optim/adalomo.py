"""AdaLomo: LOMO with an adaptive, factored learning rate (Lv et al., 2023, arXiv 2310.10195)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from leantune.optim.engine import (
    FusedOptimizer,
    GradientView,
    ParamsLike,
    UpdateTarget,
    as_rows,
    check_lr_and_weight_decay,
)
from leantune.optim.precision import LossScaler, WriteBack

__all__ = ["AdaLomo", "adalomo_update"]


def _identity(t: Tensor, axis: str = "all") -> Tensor:
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
    shard_sum: Callable[..., Tensor] = _identity,
    global_shape: torch.Size | None = None,
    workspace: Callable[[int, torch.device], Tensor] | None = None,
) -> None:
    """Apply one AdaLomo step to ``param`` in place and update ``state``.

    ``param`` may be the local shard of a larger tensor of ``global_shape`` (some of its rows under
    FSDP2; rows or columns under tensor parallelism); ``shard_sum(partial, axis)`` then sums a
    partial statistic in place over the shards that split ``axis`` (``"rows"``: a sum over rows,
    ``"cols"``: over columns, ``"all"``), so that row/column statistics and RMS values are those of
    the full tensor.

    State: ``step`` (int), and ``row`` (rows,) + ``col`` (cols,) fp32 for tensors with >= 2
    dimensions, or ``v`` (fp32, like the parameter) for vectors.

    Cost: the normalised update ``u`` is never materialised. With ``a_i`` the row factors and
    ``b_j`` the column factors, ``sum(u^2) = sum_i a_i^2 sum_j g_ij^2 b_j^2`` is a matrix-vector
    product on the squared gradient already computed for the statistics, and the update is one
    ``addcmul`` of ``g * b`` with ``step * a``. ``workspace(n, device)`` may supply a reusable
    fp32 buffer of at least ``n`` elements for those temporaries, the squares and then the scaled
    gradient (fresh allocations of tens of MB cost page faults on every update); otherwise each
    chunk allocates its own.
    """
    shape = global_shape if global_shape is not None else param.shape
    state["step"] = state.get("step", 0) + 1
    rho = 1.0 - math.pow(state["step"], decay_rate)  # rho_1 = 0: no bias correction needed
    common = {
        "lr": lr,
        "weight_decay": weight_decay,
        "eps": eps,
        "clip_threshold": clip_threshold,
        "writer": writer,
        "compensation": compensation,
        "shard_sum": shard_sum,
    }
    if len(shape) >= 2:
        _matrix_update(
            param, grad, state, rho, shape, chunk_elements=chunk_elements, workspace=workspace, **common
        )
    else:
        _vector_update(param, grad, state, rho, shape, **common)


def _finish(
    sums: Tensor, numel: int, lr: float, weight_decay: float, eps2: float, clip_threshold: float, shard_sum
) -> tuple[Tensor, Tensor]:
    """(step size, decay factor) from the partial ``[sum(u^2), sum(p^2)]`` of this shard."""
    rms_u, rms_p = shard_sum(sums, "all").div_(numel).sqrt_()
    eta = torch.clamp(rms_p, min=eps2) * lr
    step_size = eta / torch.clamp(rms_u / clip_threshold, min=1.0)
    return step_size, 1.0 - eta * weight_decay


def _matrix_update(
    param,
    grad,
    state,
    rho,
    shape,
    *,
    lr,
    weight_decay,
    eps,
    clip_threshold,
    writer,
    compensation,
    shard_sum,
    chunk_elements,
    workspace,
) -> None:
    eps1, eps2 = eps
    numel = math.prod(shape)
    n_rows = numel // shape[-1]
    rows = as_rows(param)
    comp_rows = as_rows(compensation) if compensation is not None else None
    device = param.device
    if "row" not in state:
        state["row"] = torch.zeros(rows.shape[0], dtype=torch.float32, device=device)
        state["col"] = torch.zeros(rows.shape[1], dtype=torch.float32, device=device)
    row_stat, col_stat = state["row"], state["col"]
    chunks = list(grad.chunks(chunk_elements))
    single = len(chunks) == 1
    largest = max(sl.stop - sl.start for sl in chunks) * rows.shape[1] if chunks else 0
    # One workspace serves both: the squares (passes 1-2) are dead before the scaled gradient
    # (pass 3) is written.
    buf_sq = buf_scaled = workspace(largest, device) if workspace is not None and largest else None

    def square(sl: slice, g: Tensor | None = None) -> Tensor:
        g = grad.chunk(sl) if g is None else g
        if buf_sq is None:
            return g.square()
        return torch.square(g, out=buf_sq[: g.numel()].view(g.shape))

    # Pass 1: G = g^2 + eps1, its row and column means (eps1 is added to the means: same value).
    new_row = torch.empty_like(row_stat)
    col_sum = torch.zeros_like(col_stat)
    kept_g = kept_sq = None
    for sl in chunks:
        g = grad.chunk(sl)
        sq = square(sl, g)
        torch.sum(sq, dim=1, out=new_row[sl])
        col_sum.addmv_(sq.t(), torch.ones(sq.shape[0], dtype=torch.float32, device=device))
        if single:
            kept_g, kept_sq = g, sq
        del g, sq
    new_row = shard_sum(new_row, "cols").div_(shape[-1]).add_(eps1)
    col_mean = shard_sum(col_sum, "rows").div_(n_rows).add_(eps1)
    row_stat.mul_(rho).add_(new_row, alpha=1.0 - rho)
    col_stat.mul_(rho).add_(col_mean, alpha=1.0 - rho)
    row_mean = shard_sum(row_stat.sum(), "rows") / n_rows
    row_factor = (row_stat / row_mean).rsqrt_()  # a_i
    col_factor = col_stat.rsqrt()  # b_j
    # Pass 2: sum(u^2) = sum_i a_i^2 (g_i^2 . b^2), and sum(p^2) (the RMS is taken before the update).
    col_factor_sq = col_factor.square()
    sums = torch.zeros(2, dtype=torch.float32, device=device)
    for sl in chunks:
        sq = kept_sq if single else square(sl)
        sums[0] += torch.dot(row_factor[sl].square(), torch.mv(sq, col_factor_sq))
        sums[1] += torch.linalg.vector_norm(rows[sl], 2, dtype=torch.float32).square()
        del sq
    kept_sq = None
    step_size, decay = _finish(sums, numel, lr, weight_decay, eps2, clip_threshold, shard_sum)
    row_step = (row_factor * step_size).unsqueeze(1)  # step * a_i
    # Pass 3: p <- p * decay - (g * b) * (step * a).
    for sl in chunks:
        g = kept_g if single else grad.chunk(sl)
        if buf_scaled is None:
            scaled = g.mul(col_factor)
        else:
            scaled = torch.mul(g, col_factor, out=buf_scaled[: g.numel()].view(g.shape))
        del g

        def apply(w: Tensor, scaled: Tensor = scaled, rs: Tensor = row_step[sl]) -> None:
            if weight_decay != 0.0:
                w.mul_(decay)
            w.addcmul_(scaled, rs, value=-1.0)

        writer.apply(rows[sl], apply, comp_rows[sl] if comp_rows is not None else None)
        del scaled


def _vector_update(
    param, grad, state, rho, shape, *, lr, weight_decay, eps, clip_threshold, writer, compensation, shard_sum
) -> None:
    eps1, eps2 = eps
    if "v" not in state:
        state["v"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    v = state["v"].view(-1)
    g = grad.full().view(-1)
    v.mul_(rho).add_(g.square().add_(eps1), alpha=1.0 - rho)
    u = g.mul(v.rsqrt())
    sums = torch.stack([u.square().sum(), torch.linalg.vector_norm(param, 2, dtype=torch.float32).square()])
    step_size, decay = _finish(sums, math.prod(shape), lr, weight_decay, eps2, clip_threshold, shard_sum)

    def apply(w: Tensor) -> None:
        if weight_decay != 0.0:
            w.mul_(decay)
        w.sub_(u.view(w.shape).mul_(step_size))

    writer.apply(
        param.view(-1) if param.dim() else param,
        apply,
        compensation.view(-1) if compensation is not None and param.dim() else compensation,
    )


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
        clip_grad_norm, clip_grad_value, loss_scale, accumulation_steps, rounding, seed, collectives: see
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
        collectives: Any = "auto",
    ) -> None:
        check_lr_and_weight_decay(lr, weight_decay)
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
        self._buffers: dict[torch.device, Tensor] = {}
        super().__init__(
            params,
            defaults,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            loss_scale=loss_scale,
            accumulation_steps=accumulation_steps,
            rounding=rounding,
            seed=seed,
            collectives=collectives,
        )

    def _update(
        self, target: UpdateTarget, grad: GradientView, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        adalomo_update(
            target.tensor,
            grad,
            state,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            decay_rate=group["decay_rate"],
            clip_threshold=group["clip_threshold"],
            writer=self.writer,
            compensation=self._compensation(target.tensor, state),
            chunk_elements=self.chunk_elements,
            shard_sum=lambda t, axis: self.collectives.shard_sum_over(self._sharded(target), t, axis),
            global_shape=target.shape,
            workspace=self._workspace,
        )

    @staticmethod
    def _sharded(target: UpdateTarget) -> Tensor:
        # The parameter when it is a DTensor (its placements say which ranks hold which part), else
        # the tensor being updated (what collectives of one's own are handed).
        return target.param if hasattr(target.param, "device_mesh") else target.tensor

    def _workspace(self, n: int, device: torch.device) -> Tensor:
        # One fp32 buffer per device, grown to the largest chunk seen and reused by every update.
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, device=device)
            self._buffers[device] = buf
        return buf

    def _init_param_state(self, target: UpdateTarget, state: dict[str, Any]) -> None:
        local = as_rows(target.tensor)
        state["step"] = 0
        if len(target.shape) >= 2:
            state["row"] = torch.zeros(local.shape[0], dtype=torch.float32, device=local.device)
            state["col"] = torch.zeros(local.shape[1], dtype=torch.float32, device=local.device)
        else:
            state["v"] = torch.zeros(target.tensor.shape, dtype=torch.float32, device=local.device)
