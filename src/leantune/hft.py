"""HFT — Half Fine-Tuning (Hui et al., 2024, arXiv 2404.18466): freeze half of each block at random.

The paper's update is ``theta <- theta - lr * (M * grad)`` with a 0/1 mask ``M`` per matrix. Per
transformer block, half of the attention matrices are frozen at random (2 of q, k, v, o); in a
random half of the blocks 2 of the 3 feed-forward matrices (gate, up, down) are frozen, in the other
half 1. The blocks and their matrices come from :mod:`leantune.anatomy`, so the rule holds for any
layout, in the same terms:

* an attention group of ``n`` matrices freezes ``n // 2`` of them (with an odd ``n``, e.g. DeepSeek's
  five latent-attention matrices, a random half of the blocks freezes one more);
* every feed-forward group (a dense MLP, each expert of a MoE block, a shared expert) of ``n``
  matrices freezes ``n // 2`` in one half of the blocks and ``n - n // 2`` in the other: 1 or 2 of
  gate/up/down, 1 of GPT-2's or OPT's 2 matrices. MoE experts follow the rule expert by expert;
* **fused tensors** (Phi-3's ``qkv_proj`` and ``gate_up_proj``, GPT-2's ``c_attn``, GPT-NeoX's and
  Falcon's ``query_key_value``, MoE ``gate_up_proj`` and ``down_proj``) hold several matrices: each
  is a unit of its own. A fused tensor with a frozen part stays trainable and gets its trainable
  parts as optimizer segments (:mod:`leantune.optim.segments`): the fused optimizers update each
  part exactly as a separate matrix and never touch the frozen rows or columns, which keep no
  optimizer state. Ordinary ``step()`` optimizers cannot do that and are refused for such models.

A frozen matrix takes its bias with it. The rest of the model follows a fixed rule (:data:`POLICY`):

* **input embeddings: frozen.** A lookup table whose rows only move for tokens of the new data,
  which is drift for everything learned before; for large vocabularies it is also the largest
  gradient a fused optimizer has to hold.
* **LM head: trainable.** New tasks need a new output distribution. When the head is tied to the
  embeddings (one tensor) it counts as the head: trainable.
* **norms, MoE routers, position embeddings and any other parameter outside the matrices:
  trainable.** Few numbers per block; freezing them saves nothing.

Frozen whole tensors are ``requires_grad=False``: no gradient, no optimizer state and, with the
fused optimizers, no hook at all (``opt.refresh_hooks()`` after a re-draw).

The draw depends only on ``(seed, stage, redraw)`` and the block structure, so it is reproducible:
a *stage* is one ``leantune train`` run on top of the previous one (numbered from 0; a run started
from a model directory whose ``hft_state.json`` records stage ``s`` is stage ``s + 1``), a *redraw*
is the epoch index when ``train.hft_redraw=epoch`` (else 0). The trainable fraction is counted in
parameters, not matrices: with grouped-query attention k and v are smaller than q and o.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from leantune.anatomy import Anatomy, AnatomyError, BlockAnatomy, Unit, model_anatomy
from leantune.optim.segments import Segment

__all__ = [
    "POLICY",
    "STATE_FILE",
    "BlockUnits",
    "HftError",
    "HftMask",
    "HftState",
    "HftTracker",
    "MaskReport",
    "apply_mask",
    "block_units",
    "count_parameters",
    "draw_mask",
    "freeze_summary",
    "load_state",
    "summary",
]

POLICY = {
    "embeddings": "frozen",
    "lm_head": "trainable",
    "norms": "trainable",
    "tied_embeddings": "trainable",
    "routers": "trainable",
    "other": "trainable",
}
STATE_FILE = "hft_state.json"
# 2: unit names relative to the block ("self_attn.q_proj", "self_attn.qkv_proj[q]"); version 1
# files name LLaMA projections by their last component ("q_proj") and still load.
_VERSION = 2
_READABLE = (1, 2)


class HftError(ValueError):
    """The model cannot be half fine-tuned as asked (unrecognised structure, mismatched mask)."""


@dataclass(frozen=True)
class BlockUnits:
    """What the draw needs of one block: its name, its attention units and feed-forward groups."""

    name: str
    attention: tuple[str, ...]
    ffn: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, block: BlockAnatomy) -> BlockUnits:
        return cls(
            block.name,
            tuple(u.name for u in block.attention),
            tuple(tuple(u.name for u in g) for g in block.ffn),
        )


def block_units(anatomy: Anatomy) -> list[BlockUnits]:
    """The :class:`BlockUnits` of every block, in model order.

    Raises:
        HftError: a block has no attention matrices or no feed-forward matrices.
    """
    unknown = [rel for rel, how in anatomy.fused.items() if "not recognised" in how]
    if unknown:
        raise HftError(
            f"train.hft on {anatomy.family}: {', '.join(unknown)} holds gate and up projections in one "
            "tensor in a layout leantune does not recognise, so half of the feed-forward matrices "
            "cannot be chosen; train it fully (train.hft=false) or with peft.method=lora"
        )
    out = []
    for b in anatomy.blocks:
        if not b.attention or not any(b.ffn):
            what = "attention" if not b.attention else "feed-forward"
            raise HftError(
                f"train.hft on {anatomy.family}: block {b.name} has no {what} matrices leantune can "
                "find, so half of it cannot be chosen; train it fully (train.hft=false) or with peft"
            )
        out.append(BlockUnits.of(b))
    return out


@dataclass(frozen=True)
class HftMask:
    """Which units are frozen in each block, and the draw that produced it."""

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


def _half(n: int, more: bool) -> int:
    return n // 2 + (1 if n % 2 and more else 0)


def _draw_half(rng: random.Random, n: int) -> set[int]:
    """A random half of ``n`` blocks (the odd one goes either way)."""
    return set(rng.sample(range(n), _half(n, rng.random() < 0.5) if n % 2 else n // 2))


def draw_mask(blocks: Sequence[BlockUnits], *, seed: int, stage: int, redraw: int = 0) -> HftMask:
    """Draw the HFT mask for ``blocks`` (in model order), deterministic per ``(seed, stage, redraw)``.

    A random half of the blocks (one more, at random, when their number is odd) freezes the larger
    half of every feed-forward group with an odd number of units (2 of gate/up/down), the others
    the smaller half (1). Every block freezes half of its attention units (with an odd number, a
    second random half of the blocks freezes the larger half).
    """
    if not blocks:
        raise HftError("draw_mask needs at least one block")
    # A string seed is hashed with SHA-512 by `random`: stable across processes and platforms.
    rng = random.Random(f"leantune-hft:{seed}:{stage}:{redraw}")
    n = len(blocks)
    two = _draw_half(rng, n)
    # Drawn only when needed, so that the draws of even layouts (LLaMA) stay what they were.
    more_attention = _draw_half(rng, n) if any(len(b.attention) % 2 for b in blocks) else set()
    frozen: dict[str, tuple[str, ...]] = {}
    for i, block in enumerate(blocks):
        att = list(block.attention)
        chosen = sorted(rng.sample(att, _half(len(att), i in more_attention)), key=att.index)
        for group in block.ffn:
            units = list(group)
            chosen += sorted(rng.sample(units, _half(len(units), i in two)), key=units.index)
        frozen[block.name] = tuple(chosen)
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
    """What :func:`apply_mask` did: parameter counts, the frozen tensors, and the trainable parts
    of fused tensors (optimizer segments, by parameter name)."""

    trainable: int
    total: int
    frozen_names: tuple[str, ...]
    segments: dict[str, tuple[Segment, ...]] = field(default_factory=dict)
    frozen_parts: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def _resolve(block: BlockAnatomy, name: str) -> Unit:
    """The unit called ``name`` in ``block``; version-1 names ("q_proj") match by last component."""
    units = list(block.units())
    for u in units:
        if u.name == name:
            return u
    tail = [u for u in units if u.name.rsplit(".", 1)[-1] == name]
    if len(tail) == 1:
        return tail[0]
    raise HftError(f"the HFT mask freezes {name} in {block.name}, which has no such matrix")


def apply_mask(model: nn.Module, mask: HftMask, anatomy: Anatomy | None = None) -> MaskReport:
    """Freeze the units of ``mask`` (and the input embeddings, :data:`POLICY`); everything else
    trains. Fused tensors with frozen parts get their trainable parts as segments
    (:attr:`MaskReport.segments`), to be given to the optimizer with ``opt.set_segments``.

    Applying a new mask fully replaces the previous one. Call ``opt.refresh_hooks()`` (and
    ``opt.set_segments(report.segments)``) on a fused optimizer afterwards.

    Raises:
        HftError: the mask names blocks or units the model does not have.
    """
    anatomy = anatomy if anatomy is not None else _anatomy(model)
    by_name = {b.name: b for b in anatomy.blocks}
    if set(by_name) != set(mask.frozen):
        extra = sorted(set(mask.frozen) - set(by_name))[:3]
        absent = sorted(set(by_name) - set(mask.frozen))[:3]
        raise HftError(
            f"the HFT mask does not fit this model (mask-only blocks {extra}, unmasked blocks {absent})"
        )
    # per parameter: (unit name, piece, frozen?) for every unit that owns part of it
    owners: dict[str, list[tuple[str, Any, bool]]] = {}
    for bname, block in by_name.items():
        frozen_units = {_resolve(block, n).name for n in mask.frozen[bname]}
        for unit in block.units():
            for piece in unit.pieces:
                owners.setdefault(piece.param, []).append((unit.name, piece, unit.name in frozen_units))
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    # Tied to the head (one tensor): it is the head, trainable (POLICY["tied_embeddings"]).
    embed_ids = {id(p) for p in embed.parameters() if id(p) not in head_ids} if embed is not None else set()
    names, parts, segments = [], [], {}
    trainable = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        entries = owners.get(name, [])
        fused = any(not piece.whole for _, piece, _ in entries)
        if id(p) in embed_ids:
            is_frozen, keep = True, []
        elif fused:
            keep = [(u, piece) for u, piece, f in entries if not f]
            parts += [f"{name}[{u}]" for u, _, f in entries if f]
            is_frozen = not keep
        else:
            is_frozen, keep = any(f for _, _, f in entries), []
        p.requires_grad_(not is_frozen)
        if is_frozen:
            names.append(name)
        elif fused:
            segs = tuple(Segment(u, piece.rows, piece.cols) for u, piece in keep)
            segments[name] = segs
            trainable += sum(math.prod(s.shape(p.shape)) for s in segs)
        else:
            trainable += p.numel()
    return MaskReport(trainable, total, tuple(names), segments, tuple(parts))


def _anatomy(model: nn.Module) -> Anatomy:
    try:
        return model_anatomy(model)
    except AnatomyError as err:
        raise HftError(f"train.hft: {err}") from None


@dataclass
class HftState:
    """The masks a model has been trained under, oldest first (saved as ``hft_state.json``).

    Each entry records one mask (stage, redraw, frozen units), the parameter counts it gave and the
    optimizer step from which it applied. The last entry is the mask in force.
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
                "frozen_parts": list(report.frozen_parts),
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
        if data.get("version") not in _READABLE:
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
    fused = f", {len(report.frozen_parts)} parts of fused tensors frozen" if report.frozen_parts else ""
    return (
        f"HFT stage {mask.stage} (seed {mask.seed}, redraw {mask.redraw}): "
        f"{report.trainable:,} of {report.total:,} parameters trainable ({report.fraction:.2%}), "
        f"{len(report.frozen_names)} tensors frozen{fused}"
    )


_EXPERT = re.compile(r"\[\d+\]")


def _short(unit: str) -> str:
    # "self_attn.q_proj" -> "q", "self_attn.qkv_proj[k]" -> "qkv[k]", "mlp.experts[3].gate" -> "gate"
    leaf = _EXPERT.sub("", unit).rsplit(".", 1)[-1]
    return leaf.replace("_proj", "")


def freeze_summary(mask: HftMask) -> str:
    """The frozen units per block, compactly: ``0:k,o,up 1:q,v,gate,down``; experts are counted
    (``1:q,v,experts 3 gate/2 up/3 down``)."""
    parts = []
    for block, units in mask.frozen.items():
        plain = [_short(u) for u in units if not _EXPERT.search(u)]
        experts = Counter(_short(u) for u in units if _EXPERT.search(u))
        text = ",".join(plain)
        if experts:
            text += (", " if text else "") + "experts " + "/".join(f"{n} {r}" for r, n in experts.items())
        parts.append(f"{block.rsplit('.', 1)[-1]}:{text}")
    return " ".join(parts)


class HftTracker:
    """The HFT mask of one training run: drawn for a new stage, re-drawn per epoch, or restored.

    Args:
        model: the model to mask (its anatomy is found once, see :mod:`leantune.anatomy`).
        seed: ``train.hft_seed``.
        previous: the state saved with the model this run starts from (its history is kept and
            this run is stage ``previous.next_stage``), or ``None`` for stage 0.
    """

    def __init__(self, model: nn.Module, seed: int, previous: HftState | None = None) -> None:
        self.model = model
        self.seed = int(seed)
        self.anatomy = _anatomy(model)
        self.blocks = block_units(self.anatomy)
        self.state = HftState(list(previous.history) if previous is not None else [])
        self.report = self._apply(draw_mask(self.blocks, seed=self.seed, stage=self.state.next_stage), 0)

    def _apply(self, mask: HftMask, step: int) -> MaskReport:
        report = apply_mask(self.model, mask, self.anatomy)
        self.state.record(mask, report, step=step)
        return report

    @property
    def mask(self) -> HftMask:
        return self.state.current

    @property
    def segments(self) -> dict[str, tuple[Segment, ...]]:
        """Trainable parts of fused tensors under the mask in force (``opt.set_segments``)."""
        return self.report.segments

    def redraw(self, redraw: int, *, step: int) -> MaskReport:
        """Draw and apply the mask of this stage's ``redraw`` (e.g. the epoch index)."""
        self.report = self._apply(
            draw_mask(self.blocks, seed=self.seed, stage=self.mask.stage, redraw=redraw), step
        )
        return self.report

    def restore(self, state: HftState) -> MaskReport:
        """Apply the mask in force in ``state`` exactly (on resume), adopting its history."""
        self.state = HftState(list(state.history))
        self.report = apply_mask(self.model, state.current, self.anatomy)
        return self.report

    def summary(self) -> str:
        return summary(self.report, self.mask)
