"""What a config describes, built and returned: the model (with its adapters or HFT mask), the
optimizer and the object the loop steps it through, the learning-rate schedule, the batch stream.

Each builder returns what it builds; nothing is set on a trainer as a side effect, so the order
of the calls is visible in :meth:`leantune.trainer.Trainer.setup`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from leantune.config import Config, ConfigError
from leantune.data import BatchStream, Datasets, MixtureStream
from leantune.data.packing import unpack_rows
from leantune.data.streaming import StreamingStream
from leantune.models import build_model as build_hf_model
from leantune.models import check_model_dir, resolve_dtype
from leantune.optim import Stepper, is_fused, needs_create_graph
from leantune.optim import build_optimizer as build_named_optimizer

__all__ = ["build_model", "build_optimizer", "build_scheduler", "build_stream", "check_paths"]


def check_paths(cfg: Config) -> None:
    """A missing model or tokenizer directory fails here, before any data is read."""
    m = cfg.model
    if m.path is not None:
        check_model_dir(m.path)
    if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
        raise FileNotFoundError(
            f"model.tokenizer {m.tokenizer!r} does not exist: give a directory with a saved tokenizer "
            "(tokenizer.json, tokenizer_config.json), or unset it to use model.path's"
        )


def build_model(cfg: Config, tokenizer: Any, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model on ``device`` in train mode, with peft adapters (``peft.method``) or the HFT mask
    (``train.hft``) applied, and the :class:`leantune.hft.HftTracker` (``None`` without HFT)."""
    m = cfg.model
    overrides: dict[str, Any] = {}
    if m.rope_theta is not None:
        overrides["rope_theta"] = m.rope_theta
    if m.rope_scaling is not None:
        overrides["rope_scaling"] = m.rope_scaling
    attn = "eager" if needs_create_graph(cfg.optim.name) else m.attn_implementation
    try:
        model = build_hf_model(
            preset=None if m.path else m.preset,
            path=m.path,
            dtype=resolve_dtype(m.dtype),
            vocab_size=len(tokenizer) if not m.path else None,
            seed=cfg.train.seed,
            trust_remote_code=m.trust_remote_code,
            attn_implementation=attn,
            config_overrides=overrides,
        )
    except ValueError as err:  # e.g. a model.rope_scaling transformers cannot use
        raise ConfigError(f"model: {err}") from None
    model.config.use_cache = False
    if m.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, hft = _adapt_model(cfg, model)
    model.to(device)
    model.train()
    return model, hft


def _adapt_model(cfg: Config, model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    if cfg.peft.method != "none":
        from leantune.adapters import AdapterError, wrap_model

        try:
            return wrap_model(model, cfg.peft, optimizer=cfg.optim.name), None
        except AdapterError as err:
            raise ConfigError(str(err)) from None
    if cfg.train.hft:
        from leantune.hft import HftError, HftTracker, load_state

        try:
            return model, HftTracker(model, cfg.train.hft_seed, load_state(cfg.model.path))
        except HftError as err:
            raise ConfigError(str(err)) from None
    return model, None


def build_optimizer(
    cfg: Config, model: torch.nn.Module, hft: Any = None, collectives: Any = "auto"
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and what the loop calls ``backward(loss)`` on: the optimizer itself when it is
    fused into backward, else a :class:`leantune.optim.Stepper` around it. Both do accumulation,
    clipping and loss scaling the same way. ``collectives``: a fused optimizer's (see
    :class:`leantune.optim.FusedOptimizer`)."""
    o = cfg.optim
    engine: dict[str, Any] = {
        "clip_grad_norm": o.clip_grad_norm,
        "clip_grad_value": o.clip_grad_value,
        "loss_scale": o.loss_scale if o.loss_scale in (None, "dynamic") else float(o.loss_scale),
        "accumulation_steps": cfg.train.accumulation_steps,
    }
    kwargs = {"lr": o.lr, "weight_decay": o.weight_decay, **o.kwargs}
    try:
        if is_fused(o.name):
            low = cfg.model.dtype in ("bf16", "fp16")
            rounding = ("stochastic" if low else "nearest") if o.rounding == "auto" else o.rounding
            opt = build_named_optimizer(
                o.name, model, **kwargs, **engine, rounding=rounding, seed=cfg.train.seed,
                collectives=collectives,
            )  # fmt: skip
            return opt, opt
        # An HFT mask re-drawn per epoch unfreezes tensors later: give the optimizer all of
        # them now (frozen ones get no gradient, hence no state and no update).
        redraws = hft is not None and cfg.train.hft_redraw == "epoch"
        opt = build_named_optimizer(o.name, list(model.parameters()) if redraws else model, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optim: {err}") from None
    return opt, Stepper(opt, create_graph=needs_create_graph(o.name), **engine)


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config, total_steps: int) -> Any:
    """``optim.warmup_steps`` of linear warmup (at most ``total_steps - 1``), then ``optim.scheduler``
    over the rest, down to ``optim.lr * optim.min_lr_ratio``."""
    from torch.optim import lr_scheduler

    warm = min(cfg.optim.warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warm, 1)
    final = cfg.optim.min_lr_ratio
    match cfg.optim.scheduler:
        case "constant":
            main = lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        case "linear":
            main = lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=max(final, 1e-8), total_iters=rest)
        case "cosine":
            main = lr_scheduler.CosineAnnealingLR(opt, T_max=rest, eta_min=cfg.optim.lr * final)
        case other:
            raise ConfigError(f"optim.scheduler: unknown schedule {other!r}")
    if warm == 0:
        return main
    warmup = lr_scheduler.LinearLR(opt, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    return lr_scheduler.SequentialLR(opt, [warmup, main], milestones=[warm])


def build_stream(
    cfg: Config, data: Datasets, tokenizer: Any, rank: int, world_size: int
) -> BatchStream | MixtureStream | StreamingStream:
    """This rank's endless, seeded, resumable stream of training batches."""
    stream_args = {"seed": cfg.train.seed, "rank": rank, "world_size": world_size}
    batch_size, pad_id = cfg.train.batch_size, tokenizer.pad_token_id
    if data.stream_paths is not None:
        d = cfg.data
        return StreamingStream(
            data.stream_paths, d.format, d.columns, tokenizer, max_length=d.max_length,
            overlong=d.overlong, pack=d.pack is not False, batch_size=batch_size,
            pad_id=pad_id, buffer_size=d.shuffle_buffer,
            skip=0 if d.eval is not None else len(data.eval), **stream_args,
        )  # fmt: skip
    if data.weights is not None:
        sources = [
            (name, unpack_rows(s) if data.pack_refused else s) for name, s in (data.sources or {}).items()
        ]
        return MixtureStream(sources, data.weights, batch_size, pad_id, **stream_args)
    return BatchStream(data.train, batch_size, pad_id, **stream_args)
