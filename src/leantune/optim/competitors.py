"""The optimizers a user would pick instead of AdaLomo, built through their authors' own packages.

None of their code is copied here: each entry imports its package lazily (``pip install
'leantune[competitors]'`` installs them all) and only does what the package needs from a model,
e.g. which matrices GaLore projects or Adam-mini's head sizes. They step like any torch optimizer
(``loss.backward(); opt.step()``, through :class:`leantune.optim.Stepper` in the trainer), so they
hold full gradients, which is what the benchmarks compare against AdaLomo's fused update.

===============  ========================  ================================================
name             package                   what it keeps
===============  ========================  ================================================
``galore``       galore-torch              AdamW moments of gradients projected to ``rank``
                                           (SVD every ``update_proj_gap`` steps), for the
                                           linear layers; plain AdamW for the rest
``apollo``       apollo-torch              AdamW moments in a random projection (``rank``),
                                           used only to scale the raw gradient per channel
``adam_mini``    adam-mini                 one second moment per head / neuron / token
``badam``        badam                     AdamW on one transformer block at a time (fp32
                                           copy of that block), switched every
                                           ``switch_block_every`` steps; the rest frozen
``adamw8bit``    torchao                   AdamW, both moments block-quantised to 8 bits
``adamw4bit``    torchao                   the same at 4 bits
===============  ========================  ================================================

Resuming: Adam-mini and torchao's optimizers keep their whole state in ``state_dict()`` and resume
exactly. GaLore's projectors are Python objects in its state (leantune's checkpoint loader refuses
to unpickle them), APOLLO's random projector is rebuilt from a seed at a different step than where
it left off, and BAdam keeps its block order and step count outside ``state_dict()``: the trainer
refuses to resume these three (``Competitor.resume``, read by :func:`leantune.optim.resume_refusal`)
instead of continuing a different run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["COMPETITORS", "Competitor", "build_competitor", "linear_weights"]


@dataclass(frozen=True)
class Competitor:
    """One optimizer from another package."""

    package: str
    """The pip distribution that provides it."""
    module: str
    """The module imported to build it (its absence gives a ``pip install`` hint)."""
    description: str
    needs_model: bool
    """Whether it needs the model itself (parameter names, shapes or config), not only parameters."""
    resume: str | None
    """``None`` when a checkpoint resumes it exactly; otherwise why it does not."""
    build: Callable[[Any, dict[str, Any]], torch.optim.Optimizer]


def _import(name: str) -> Any:
    comp = COMPETITORS[name]
    try:
        return importlib.import_module(comp.module)
    except ImportError as err:
        raise ImportError(
            f"optimizer {name!r} needs the package {comp.package!r} ({err}): "
            f"pip install {comp.package}   (or pip install 'leantune[competitors]' for all of them)"
        ) from None


def linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights of the ``nn.Linear`` layers inside the transformer blocks: what GaLore
    and APOLLO project. The output head is left out, as in both papers (its gradient is not low rank
    in the vocabulary dimension); so are embeddings, norms and biases."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(head.weight)} if head is not None else set()
    seen: set[int] = set()
    out = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            w = module.weight
            if id(w) not in skip and id(w) not in seen:
                seen.add(id(w))
                out.append(w)
    return out


def _projected_groups(model: nn.Module, extra: dict[str, Any]) -> list[dict[str, Any]]:
    targets = linear_weights(model)
    if not targets:
        raise ValueError("found no nn.Linear weights to project (GaLore/APOLLO need linear layers)")
    ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": targets, **extra}]
    if rest:
        groups.insert(0, {"params": rest})
    return groups


def _pop(kwargs: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k, v) for k, v in defaults.items()}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python, not a rank


def _check_rank(name: str, rank: Any, gap: Any) -> None:
    if not (_is_int(rank) and rank >= 1):
        raise ValueError(f"{name}: rank must be an integer >= 1, got {rank!r}")
    if not (_is_int(gap) and gap >= 1):
        raise ValueError(f"{name}: update_proj_gap must be an integer >= 1, got {gap!r}")


def _galore(model: nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    mod = _import("galore")
    proj = _pop(kwargs, {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"})
    _check_rank("galore", proj["rank"], proj["update_proj_gap"])
    kwargs.setdefault("no_deprecation_warning", True)  # the warning is about its AdamW vs torch's
    return mod.GaLoreAdamW(_projected_groups(model, proj), **kwargs)


def _apollo(model: nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    mod = _import("apollo")
    # The APOLLO README's settings for LLaMA pre-training (APOLLO-Mini: rank 1, scale_type tensor).
    proj = _pop(
        kwargs,
        {"rank": 256, "proj": "random", "scale_type": "channel", "scale": 1.0, "update_proj_gap": 200,
         "proj_type": "std"},
    )  # fmt: skip
    _check_rank("apollo", proj["rank"], proj["update_proj_gap"])
    if proj["proj"] not in ("random", "svd") or proj["scale_type"] not in ("channel", "tensor"):
        raise ValueError(
            f"apollo: proj must be random or svd and scale_type channel or tensor, got "
            f"{proj['proj']!r} and {proj['scale_type']!r}"
        )
    return mod.APOLLOAdamW(_projected_groups(model, proj), **kwargs)


def _adam_mini(model: nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    mod = _import("adam_mini")
    cfg = getattr(model, "config", None)
    shape = {
        "dim": getattr(cfg, "hidden_size", None),
        "n_heads": getattr(cfg, "num_attention_heads", None),
        "n_kv_heads": getattr(cfg, "num_key_value_heads", None),
    }
    for key in ("dim", "n_heads"):
        if key not in kwargs and shape[key] is None:
            raise ValueError(f"adam_mini: the model's config has no {key}: pass optim.kwargs.{key}")
    for key, value in shape.items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("verbose", False)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    opt = mod.Adam_mini(named_parameters=model.named_parameters(), **kwargs)
    # Adam-mini takes torch.cuda.device_count() as the number of ranks sharing each tensor and
    # all-gathers across them; leantune runs it unsharded in one process (the config refuses ddp
    # and fsdp), where every tensor is whole.
    opt.world_size = 1
    return opt


def _badam(model: nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    mod = _import("badam")
    block = _pop(
        kwargs,
        {"switch_block_every": 50, "switch_mode": "random", "include_embedding": False,
         "include_lm_head": False, "start_block": None},
    )  # fmt: skip
    if not (_is_int(block["switch_block_every"]) and block["switch_block_every"] >= 1):
        every = block["switch_block_every"]
        raise ValueError(f"badam: switch_block_every must be an integer >= 1, got {every!r}")
    if block["switch_mode"] not in ("random", "descending", "ascending", "fixed"):
        raise ValueError(
            f"badam: switch_mode must be random, descending, ascending or fixed, got {block['switch_mode']!r}"
        )
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kwargs)
    return mod.BlockOptimizer(base, list(model.named_parameters()), verbose=0, **block)


def _torchao(key: str, cls: str) -> Callable[[Any, dict[str, Any]], torch.optim.Optimizer]:
    def build(params: Any, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        mod = _import(key)
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return getattr(mod, cls)(params, **kwargs)

    return build


COMPETITORS: dict[str, Competitor] = {
    "galore": Competitor(
        "galore-torch",
        "galore_torch",
        "GaLore AdamW (galore-torch): low-rank projected moments",
        True,
        "GaLore keeps its projectors as Python objects in the state, which leantune will not unpickle",
        _galore,
    ),
    "apollo": Competitor(
        "apollo-torch",
        "apollo_torch",
        "APOLLO AdamW (apollo-torch): random-projection scaling",
        True,
        "APOLLO's random projector is rebuilt from a seed at the wrong step: not the same run",
        _apollo,
    ),
    "adam_mini": Competitor(
        "adam-mini",
        "adam_mini",
        "Adam-mini (adam-mini): one second moment per block",
        True,
        None,
        _adam_mini,
    ),
    "badam": Competitor(
        "badam",
        "badam",
        "BAdam (badam): block coordinate AdamW, one block at a time",
        True,
        "BAdam keeps its block order and step outside state_dict()",
        _badam,
    ),
    "adamw8bit": Competitor(
        "torchao",
        "torchao.optim",
        "torchao AdamW8bit: moments quantised to 8 bits",
        False,
        None,
        _torchao("adamw8bit", "AdamW8bit"),
    ),
    "adamw4bit": Competitor(
        "torchao",
        "torchao.optim",
        "torchao AdamW4bit: moments quantised to 4 bits",
        False,
        None,
        _torchao("adamw4bit", "AdamW4bit"),
    ),
}


def build_competitor(name: str, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """Build competitor ``name`` (a key of :data:`COMPETITORS`) for ``params`` (a model; the torchao
    ones also take a list of parameters) with ``kwargs`` (``lr``, ``weight_decay``, ``betas``, ``eps``
    and the package's own options, e.g. GaLore's ``rank``)."""
    comp = COMPETITORS[name]
    if comp.needs_model and not isinstance(params, nn.Module):
        raise ValueError(f"optimizer {name!r} needs the model (parameter names and shapes), not a list")
    if not comp.needs_model and isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    lr = kwargs.get("lr", 1e-3)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"optimizer {name!r}: lr must be > 0, got {lr!r}")
    return comp.build(params, dict(kwargs))
