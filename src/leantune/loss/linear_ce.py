"""Linear cross-entropy without the full logits: the head projection and the loss over chunks of tokens.

For hidden states ``h`` (N x H), a head ``W`` (V x H, optional bias ``b``) and targets ``y``::

    z_i   = softcap(scale * (W h_i + b))         softcap(u) = c * tanh(u / c)   (when c is set)
    nll_i = logsumexp(z_i) - z_i[y_i]            (rows with y_i == ignore_index are left out)
    loss  = sum_i nll_i / n_valid                (reduction="mean"; "sum" and "none" too)

and its gradients, with g_i = dloss/dz_i = (softmax(z_i) - onehot(y_i)) / n_valid::

    dloss/dh_i = (g_i * softcap'(.) * scale) W      dloss/dW = sum_i (g_i * softcap'(.) * scale)^T h_i

The full (N x V) logits never exist: each chunk of ``chunk`` tokens gets its logits, its softmax and
its share of both gradients, then is freed. The gradients are computed in the forward pass (the loss
is a scalar, so ``grad_output`` only scales them in backward): no logits are recomputed, the step
costs the same three head matmuls as the standard path. A second backward through the same graph
(``retain_graph``, e.g. exact gradient clipping's measuring pass) gets scaled copies of them.

What stays is the head's gradient, which the standard path holds too (from the head's backward
until the optimizer consumes it; for a tied head until the embedding's backward). Across chunks it
is summed in the compute dtype by the gradient product itself (``addmm``: fp32 accumulation inside,
one rounding per chunk), so a bf16 head's gradient differs from the standard one by a few bf16
roundings, not one.

Matches ``F.cross_entropy(F.linear(h, W, b).float(), y, ignore_index=...)`` (transformers'
``ForCausalLMLoss``): the logits are rounded to the head's dtype by the matmul, then upcast, as
there. Pure PyTorch, device-agnostic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy", "workspace_bytes", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 256
"""Tokens per chunk when none is given (see ``benchmarks/results/linear_ce.md``)."""

REDUCTIONS = ("mean", "sum", "none")


def workspace_bytes(chunk: int, vocab: int, compute_dtype: torch.dtype, softcap: bool = False) -> int:
    """Peak bytes of one chunk's temporaries: its fp32 logits (turned into the softmax in place),
    alive with either the product in the compute dtype before them or its cast back for the two
    gradient products after them (an fp32 product is the fp32 logits themselves), and for a softcap
    the tanh kept for its derivative."""
    item = torch.empty((), dtype=compute_dtype).element_size()
    return chunk * vocab * (4 + 4 * softcap + (item if item < 4 else 0))


def _chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    valid: Tensor,
    chunk: int,
    scale: float,
    softcap: float | None,
    weight_of_row: float | Tensor,
    need: tuple[bool, bool, bool],
    cdt: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row nll over the ``valid`` rows and, where ``need``-ed, the gradients of
    ``sum(weight_of_row * nll)`` w.r.t. hidden, weight and bias, ``chunk`` rows at a time
    (``weight_of_row``: one number for all rows, or a float32 tensor with one per row)."""
    need_h, need_w, need_b = need
    need_grad = need_h or need_w or need_b
    vocab = weight.shape[0]
    nll = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    w_c = weight.to(cdt)
    b_c = None if bias is None else bias.to(cdt)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, valid.numel(), chunk):
            rows = valid[start : start + chunk]
            h = hidden.index_select(0, rows).to(cdt)
            y = targets.index_select(0, rows)
            raw = h @ w_c.t()
            if b_c is not None:
                raw += b_c
            z = raw.float()
            del raw
            if scale != 1.0:
                z.mul_(scale)
            tanh = None
            if softcap is not None:
                tanh = z.div_(softcap).tanh_()  # in place: z is now tanh(u / c)
                z = tanh.mul(softcap)
            z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
            zmax = z.amax(dim=1, keepdim=True)
            p = z.sub_(zmax).exp_()  # in place: the chunk's fp32 logits become the softmax
            total = p.sum(dim=1, keepdim=True)
            nll.index_copy_(0, rows, (zmax + total.log()).squeeze(1) - z_y)
            if not need_grad:
                del p, z, tanh
                continue
            p.div_(total)
            p.scatter_add_(1, y.unsqueeze(1), torch.full_like(z_y, -1.0).unsqueeze(1))
            if isinstance(weight_of_row, Tensor):
                p.mul_(weight_of_row.index_select(0, rows).unsqueeze(1))
            else:
                p.mul_(weight_of_row)
            if tanh is not None:
                p.mul_(1.0 - tanh.square_())  # d softcap / du = 1 - tanh^2
                del tanh
            if scale != 1.0:
                p.mul_(scale)
            if grad_b is not None:
                grad_b += p.sum(dim=0)
            g = p.to(cdt)
            del p, z
            if grad_h is not None:
                grad_h.index_copy_(0, rows, (g @ w_c).to(hidden.dtype))
            if need_w:
                # Summed in the compute dtype by the product itself (addmm accumulates in fp32 and
                # rounds once per chunk): an fp32 sum of low-precision products would cost a
                # conversion pass over the whole (V x H) gradient per chunk, 1.2-2x the time.
                if grad_w is None:
                    grad_w = g.t() @ h
                else:
                    grad_w.addmm_(g.t(), h)
            del g
    del w_c
    if need_w:
        # no valid token: a zero gradient; "mixed": the bf16 sum, cast to the fp32 weights'
        grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return nll, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk: int,
        ignore_index: int,
        scale: float,
        softcap: float | None,
        reduction: str,
        grad_enabled: bool,
    ) -> Tensor:
        # needs_input_grad ignores the grad mode of the caller (forward itself runs without grad).
        need = tuple(grad_enabled and ctx.needs_input_grad[i] for i in range(3))
        valid = (targets != ignore_index).nonzero().squeeze(1)
        n_valid = valid.numel()
        # Gradients of the *mean* loss carry 1/n_valid (no valid token: zero gradients, a NaN loss).
        weight_of_row = 1.0 / n_valid if reduction == "mean" and n_valid else 1.0
        # The compute dtype: the head's, or autocast's (fp32 weights in bf16 autocast, the "mixed"
        # mode), as the standard path's matmuls would use; every product is explicit in it.
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        cdt = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        ctx.per_row = reduction == "none"
        if ctx.per_row:
            # Each row's weight in the gradient (grad_output) is known only in backward: the
            # chunks' logits are recomputed there, once.
            ctx.save_for_backward(hidden, weight, bias, targets)
            ctx.rows, ctx.need, ctx.cdt = (valid, chunk, scale, softcap), need, cdt
            return _chunks(hidden, weight, bias, targets, *ctx.rows, 1.0, (False, False, False), cdt)[0]
        args = (valid, chunk, scale, softcap, weight_of_row, need, cdt)
        nll, *grads = _chunks(hidden, weight, bias, targets, *args)
        loss = nll.sum()
        if reduction == "mean":
            loss = loss / n_valid if n_valid else loss * float("nan")
        ctx.grads = grads
        # For a second backward through the same graph (exact clipping's measuring pass comes
        # first): the inputs, to recompute the gradients by chunks.
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.args = args
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.per_row:  # reduction="none": grad_out holds each row's weight
            hidden, weight, bias, targets = ctx.saved_tensors
            row_weights = grad_out.to(torch.float32)
            _, *grads = _chunks(hidden, weight, bias, targets, *ctx.rows, row_weights, ctx.need, ctx.cdt)
            return grads[0], grads[1], grads[2], None, None, None, None, None, None, None
        grads = ctx.grads
        if grads is None:  # gave its tensors away already, and the graph was kept after all
            hidden, weight, bias, targets = ctx.saved_tensors
            _, *grads = _chunks(hidden, weight, bias, targets, *ctx.args)
        if _keeps_graph():
            # Another backward will follow (exact clipping's or loss scaling's measuring pass):
            # hand out scaled copies and keep the originals, which autograd may adopt as .grad.
            out = [None if g is None else g * grad_out.to(g.dtype) for g in grads]
        else:
            # The last backward: in place on tensors this function owns, no second copy.
            ctx.grads = None
            out = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        return out[0], out[1], out[2], None, None, None, None, None, None, None


def _keeps_graph() -> bool:
    """Whether the running backward was called with ``retain_graph`` (a private torch function;
    without it, a later backward recomputes the gradients from the saved inputs)."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(probe()) if probe is not None else False


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    ignore_index: int = -100,
    scale: float = 1.0,
    softcap: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of ``softcap(scale * (hidden @ weight.T + bias))`` against ``targets``, computed
    ``chunk`` tokens at a time (see the module docstring for the formulas).

    Args:
        hidden: ``(..., H)`` hidden states (flattened over the leading dimensions).
        weight: ``(V, H)`` head weight (a tied embedding works the same).
        targets: ``(...)`` class indices matching ``hidden``'s leading dimensions; ``ignore_index``
            rows contribute nothing.
        bias: optional ``(V,)`` head bias.
        chunk: tokens per chunk (>= 1): the peak extra memory is about ``chunk * V * 8`` bytes for
            a bf16 head (:func:`workspace_bytes`).
        scale: multiplies the logits before the softcap (e.g. Granite's ``1 / logits_scaling``).
        softcap: ``c`` of a final ``c * tanh(z / c)`` (Gemma 2's ``final_logit_softcapping``).
        reduction: ``mean`` (over non-ignored targets; NaN when there are none, like
            ``F.cross_entropy``), ``sum``, or ``none`` (per-row losses, 0 at ignored rows). With
            ``mean`` and ``sum`` the gradients are built in the forward pass; with ``none`` each
            row's weight (its ``grad_output``, e.g. a preference loss's) is known only in backward,
            which recomputes the chunks' logits: three head products per chunk instead of two.

    fp16: the gradients are rounded to fp16 here, in forward, before a loss scale arrives as
    ``grad_output``: small ones flush to zero. Use bf16 or fp32 (``ChunkedLMLoss`` refuses fp16).

    Raises:
        ValueError: bad shapes, chunk or reduction.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected hidden (..., H) "
            "and weight (V, H)"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden {tuple(hidden.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap!r}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = targets.reshape(-1)
    out = _LinearCrossEntropy.apply(
        flat_h,
        weight,
        bias,
        flat_y,
        chunk,
        ignore_index,
        float(scale),
        softcap,
        reduction,
        torch.is_grad_enabled(),
    )
    return out.view(targets.shape) if reduction == "none" else out
