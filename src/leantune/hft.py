"""HFT — Half Fine-Tuning (Hui et al., 2024, arXiv 2404.18466): freeze half of each block at random.

Per transformer block, 2 of the 4 attention projections {q, k, v, o} are frozen at random; in a
random half of the blocks 2 of the 3 feed-forward matrices {gate, up, down} are frozen, in the
other half 1 (with an odd number of blocks the extra block goes to either side at random). A frozen
matrix takes its bias (if any) with it. The rest of the model follows a fixed rule
(:data:`POLICY`):

* **input embeddings: frozen.** A lookup table whose rows only move for tokens of the new data,
  which is drift for everything learned before; for large vocabularies it is also the largest
  gradient a fused optimizer has to hold.
* **LM head: trainable.** New tasks need a new output distribution. When the head is tied to the
  embeddings (one tensor) it counts as the head: trainable.
* **norms (and any other parameter outside the masked projections): trainable.** A few numbers
  per block; freezing them saves nothing.

Freezing is ``requires_grad=False``: frozen tensors get no gradient, no optimizer state and, with
the fused optimizers, no hook at all (``opt.refresh_hooks()`` after a re-draw). This is the
paper's update ``theta <- theta - lr * (M * grad)`` with a 0/1 mask ``M`` per matrix.

The draw depends only on ``(seed, stage, redraw)`` and the block names, so it is reproducible: a
*stage* is one ``leantune train`` run on top of the previous one (numbered from 0; a run started
from a model directory whose ``hft_state.json`` records stage ``s`` is stage ``s + 1``), a
*redraw* is the epoch index when ``train.hft_redraw=epoch`` (else 0). The trainable fraction is
counted in parameters, not matrices: with grouped-query attention k and v are smaller than q and o.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "ATTENTION",
    "FEED_FORWARD",
    "POLICY",
    "STATE_FILE",
    "Block",
    "HftError",
    "HftMask",
    "HftState",
    "HftTracker",
    "MaskReport",
    "apply_mask",
    "count_parameters",
    "draw_mask",
    "find_blocks",
    "freeze_summary",
    "load_state",
    "summary",
]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")
POLICY = {
    "embeddings": "frozen",
    "lm_head": "trainable",
    "norms": "trainable",
    "tied_embeddings": "trainable",
}
STATE_FILE = "hft_state.json"
_VERSION = 1


class HftError(ValueError):
    """The model cannot be half fine-tuned as asked (unrecognised structure, mismatched mask)."""


@dataclass(frozen=True)
class Block:
    """One transformer block: its name (``model.layers.3``) and the module name of each projection."""

    name: str
    modules: dict[str, str]


def _block_prefix(name: str) -> str | None:
    # The block is the path up to the last numeric component: model.layers.3.self_attn.q_proj
    # -> model.layers.3 (a ModuleList index).
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    return ".".join(parts[: idx[-1] + 1]) if idx else None


def find_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of ``model`` with their q/k/v/o and gate/up/down projections.

    Raises:
        HftError: no block has these projections, or some block lacks one (the message lists the
            linear layers that were found, e.g. a fused ``qkv_proj``).
    """
    roles = ATTENTION + FEED_FORWARD
    found: dict[str, dict[str, str]] = {}
    linear_names: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            linear_names.add(leaf)
        if leaf not in roles or not any(True for _ in module.parameters(recurse=False)):
            continue
        block = _block_prefix(name)
        if block is None:
            continue
        if leaf in found.setdefault(block, {}):
            raise HftError(f"block {block} has two modules called {leaf}: {found[block][leaf]} and {name}")
        found[block][leaf] = name
    seen = ", ".join(sorted(linear_names)) or "none"
    if not found:
        raise HftError(
            "train.hft needs transformer blocks with q_proj/k_proj/v_proj/o_proj attention and "
            f"gate_proj/up_proj/down_proj feed-forward projections (LLaMA-style); this model has "
            f"none. Linear layers found: {seen}"
        )
    blocks = []
    for name, modules in found.items():
        missing = [r for r in roles if r not in modules]
        if missing:
            raise HftError(
                f"train.hft: block {name} has no {', '.join(missing)} (it has "
                f"{', '.join(sorted(modules))}); HFT needs all of {', '.join(roles)}. "
                f"Linear layers found in the model: {seen}"
            )
        blocks.append(Block(name, modules))
    return blocks


@dataclass(frozen=True)
class HftMask:
    """Which projections are frozen in each block, and the draw that produced it."""

    seed: int
    stage: int
    redraw: int
    frozen: dict[str, tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "stage": self.stage,
            "redraw": self.redraw,
            "frozen": {b: list(r) for b, r in self.frozen.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HftMask:
        return cls(
            int(data["seed"]),
            int(data["stage"]),
            int(data["redraw"]),
            {str(b): tuple(r) for b, r in data["frozen"].items()},
        )


def draw_mask(blocks: Sequence[str], *, seed: int, stage: int, redraw: int = 0) -> HftMask:
    """Draw the HFT mask for ``blocks`` (block names, in model order), deterministic per
    ``(seed, stage, redraw)``.

    Per block 2 of :data:`ATTENTION` are frozen; in ``len(blocks) // 2`` blocks chosen at random
    (one more, at random, when the count is odd) 2 of :data:`FEED_FORWARD`, in the others 1.
    """
    if not blocks:
        raise HftError("draw_mask needs at least one block")
    # A string seed is hashed with SHA-512 by `random`: stable across processes and platforms.
    rng = random.Random(f"leantune-hft:{seed}:{stage}:{redraw}")
    n = len(blocks)
    n_two = n // 2 + (1 if n % 2 and rng.random() < 0.5 else 0)
    two = set(rng.sample(range(n), n_two))
    frozen: dict[str, tuple[str, ...]] = {}
    for i, block in enumerate(blocks):
        attn = sorted(rng.sample(ATTENTION, 2), key=ATTENTION.index)
        ffn = sorted(rng.sample(FEED_FORWARD, 2 if i in two else 1), key=FEED_FORWARD.index)
        frozen[block] = (*attn, *ffn)
    return HftMask(seed, stage, redraw, frozen)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter elements, each distinct tensor once (tied weights once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@dataclass(frozen=True)
class MaskReport:
    """What :func:`apply_mask` did: parameter counts and the frozen tensors by name."""

    trainable: int
    total: int
    frozen_names: tuple[str, ...]

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def apply_mask(model: nn.Module, mask: HftMask, blocks: Iterable[Block] | None = None) -> MaskReport:
    """Set ``requires_grad`` on every parameter of ``model`` by ``mask`` and :data:`POLICY`.

    Every parameter not frozen by the mask or the policy becomes trainable, so applying a new
    mask fully replaces the previous one. Call ``opt.refresh_hooks()`` on a fused optimizer
    afterwards.

    Raises:
        HftError: the mask names blocks or projections the model does not have.
    """
    by_name = {b.name: b for b in (blocks if blocks is not None else find_blocks(model))}
    if set(by_name) != set(mask.frozen):
        extra = sorted(set(mask.frozen) - set(by_name))[:3]
        absent = sorted(set(by_name) - set(mask.frozen))[:3]
        raise HftError(
            f"the HFT mask does not fit this model (mask-only blocks {extra}, unmasked blocks {absent})"
        )
    frozen: set[int] = set()
    for block, roles in mask.frozen.items():
        for role in roles:
            if role not in by_name[block].modules:
                raise HftError(f"the HFT mask freezes {role} in {block}, which has no such module")
            module = model.get_submodule(by_name[block].modules[role])
            frozen.update(id(p) for p in module.parameters())
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    if embed is not None:
        # Tied to the head (one tensor): it is the head, trainable (POLICY["tied_embeddings"]).
        frozen.update(id(p) for p in embed.parameters() if id(p) not in head_ids)
    names = []
    for name, p in model.named_parameters():
        is_frozen = id(p) in frozen
        p.requires_grad_(not is_frozen)
        if is_frozen:
            names.append(name)
    trainable, total = count_parameters(model)
    return MaskReport(trainable, total, tuple(names))


@dataclass
class HftState:
    """The masks a model has been trained under, oldest first (saved as ``hft_state.json``).

    Each entry records one mask (stage, redraw, frozen projections), the parameter counts it gave
    and the optimizer step from which it applied. The last entry is the mask in force.
    """

    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def current(self) -> HftMask:
        if not self.history:
            raise HftError("no HFT mask recorded yet")
        return HftMask.from_dict(self.history[-1])

    @property
    def next_stage(self) -> int:
        """Stage index of a new training stage started from a model with this state."""
        return self.history[-1]["stage"] + 1 if self.history else 0

    def record(self, mask: HftMask, report: MaskReport, *, step: int) -> None:
        self.history.append(
            {
                **mask.to_dict(),
                "step": int(step),
                "trainable_parameters": report.trainable,
                "total_parameters": report.total,
                "trainable_fraction": report.fraction,
                "frozen_tensors": list(report.frozen_names),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {"version": _VERSION, "policy": POLICY, "history": self.history}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / STATE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HftState:
        if data.get("version") != _VERSION:
            raise HftError(f"unsupported {STATE_FILE} version {data.get('version')!r}")
        return cls(list(data["history"]))


def load_state(directory: str | Path | None) -> HftState | None:
    """The :class:`HftState` saved in ``directory`` (a model or checkpoint dir), or ``None``."""
    if directory is None:
        return None
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return HftState.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise HftError(f"{path}: unreadable HFT state ({err})") from None


def summary(report: MaskReport, mask: HftMask) -> str:
    """One line for the log: stage, redraw and the exact trainable fraction."""
    return (
        f"HFT stage {mask.stage} (seed {mask.seed}, redraw {mask.redraw}): "
        f"{report.trainable:,} of {report.total:,} parameters trainable ({report.fraction:.2%}), "
        f"{len(report.frozen_names)} tensors frozen"
    )


def freeze_summary(mask: HftMask) -> str:
    """The frozen projections per block, compactly: ``0:k,o,up 1:q,v,gate,down``."""
    short = {r: r.removesuffix("_proj") for r in ATTENTION + FEED_FORWARD}
    return " ".join(
        f"{b.rsplit('.', 1)[-1]}:{','.join(short[r] for r in roles)}" for b, roles in mask.frozen.items()
    )


class HftTracker:
    """The HFT mask of one training run: drawn for a new stage, re-drawn per epoch, or restored.

    Args:
        model: the model to mask (its blocks are found once, see :func:`find_blocks`).
        seed: ``train.hft_seed``.
        previous: the state saved with the model this run starts from (its history is kept and
            this run is stage ``previous.next_stage``), or ``None`` for stage 0.
    """

    def __init__(self, model: nn.Module, seed: int, previous: HftState | None = None) -> None:
        self.model = model
        self.seed = int(seed)
        self.blocks = find_blocks(model)
        self.state = HftState(list(previous.history) if previous is not None else [])
        self.report = self._apply(draw_mask(self._names(), seed=self.seed, stage=self.state.next_stage), 0)

    def _names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def _apply(self, mask: HftMask, step: int) -> MaskReport:
        report = apply_mask(self.model, mask, self.blocks)
        self.state.record(mask, report, step=step)
        return report

    @property
    def mask(self) -> HftMask:
        return self.state.current

    def redraw(self, redraw: int, *, step: int) -> MaskReport:
        """Draw and apply the mask of this stage's ``redraw`` (e.g. the epoch index)."""
        self.report = self._apply(
            draw_mask(self._names(), seed=self.seed, stage=self.mask.stage, redraw=redraw), step
        )
        return self.report

    def restore(self, state: HftState) -> MaskReport:
        """Apply the mask in force in ``state`` exactly (on resume), adopting its history."""
        self.state = HftState(list(state.history))
        self.report = apply_mask(self.model, state.current, self.blocks)
        return self.report

    def summary(self) -> str:
        return summary(self.report, self.mask)
