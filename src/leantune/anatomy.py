"""The anatomy of a causal LM: its blocks, their attention and feed-forward matrices, experts,
embeddings and head, found from the module structure and transformers' own conventions.

Nothing here is a table of names per family:

* **blocks** are the modules whose class is in the model's ``_no_split_modules`` (what transformers
  itself keeps whole when it places or shards a model); failing that, the longest ``ModuleList``
  of one class under ``get_decoder()``;
* **attention** is the outermost module of a block whose class name contains ``Attention``; its
  ``nn.Linear`` / ``Conv1D`` layers are its matrices, in registration order;
* **feed-forward** is every other linear layer of the block, grouped by the module that holds it (a
  dense MLP, a shared expert; OPT keeps ``fc1``/``fc2`` in the block itself), plus **experts**:
  modules holding 3-D parameters ``(experts, ., .)``, read with the layout attributes transformers'
  experts interface defines (``is_transposed``, ``is_concatenated``; names ``gate_up_proj``,
  ``up_proj``, ``down_proj``). A linear layer with one output per expert (or a single output) next to
  experts is a **router**, not a feed-forward matrix;
* **fused matrices** are told apart by probing, not by name. For attention, one forward of two
  tokens with each projection's output replaced by a leaf: token 0 attends only to itself, so the
  attention output of token 0 depends on its values only, that of token 1 also on token 0's keys,
  and no output depends on token 0's queries. The gradients therefore sort every output feature of
  a projection into q (no gradient), k (gradient through token 1 only) or v (gradient through token
  0): a projection whose features fall into q, k and v with ``|k| = |v|`` is a fused qkv (Phi-3's
  ``qkv_proj``, GPT-2's ``c_attn``, GPT-NeoX's per-head interleaved ``query_key_value``, Falcon's
  grouped one), with its exact row (or column) sets. A feed-forward layer with twice the width of
  the group's down projection is checked to be ``[gate; up]`` (or interleaved) by mixing two
  tokens' outputs pair by pair and comparing the down projection's input.

A **unit** is one matrix as HFT counts them (q, k, v, o; gate, up, down; per expert): whole tensors,
or row / column sets of a fused tensor (:class:`Piece`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from leantune.optim.segments import Index, index_size, index_tensor
from leantune.optim.segments import compress_index as _compress

__all__ = [
    "Anatomy",
    "AnatomyError",
    "BlockAnatomy",
    "Index",
    "Piece",
    "Unit",
    "find_blocks",
    "index_size",
    "index_tensor",
    "model_anatomy",
]


class AnatomyError(ValueError):
    """The model's structure is not one leantune can read (the message names what is missing)."""


@dataclass(frozen=True)
class Piece:
    """Part of one parameter: rows of its ``(prod(shape[:-1]), shape[-1])`` view, and columns.

    ``None`` means all rows (or columns). A 1-D parameter's elements are its rows.
    """

    param: str
    rows: Index | None = None
    cols: Index | None = None

    @property
    def whole(self) -> bool:
        return self.rows is None and self.cols is None


@dataclass(frozen=True)
class Unit:
    """One matrix as HFT counts it (with its bias), possibly a part of fused tensors."""

    name: str
    pieces: tuple[Piece, ...]
    numel: int


@dataclass(frozen=True)
class BlockAnatomy:
    """One transformer block: its attention units and its feed-forward groups (a dense MLP, each
    expert, a shared expert), each a tuple of units."""

    name: str
    attention: tuple[Unit, ...]
    ffn: tuple[tuple[Unit, ...], ...]

    def units(self) -> Iterator[Unit]:
        yield from self.attention
        for group in self.ffn:
            yield from group


@dataclass(frozen=True)
class Anatomy:
    """What :func:`model_anatomy` found."""

    family: str
    blocks: tuple[BlockAnatomy, ...]
    embedding: str | None
    head: str | None
    tied: bool
    fused: dict[str, str] = field(default_factory=dict)
    """Fused tensors (relative name in a block -> how its parts were found)."""
    routers: tuple[str, ...] = ()
    """Parameter names of MoE routers (linear layers with one output per expert or a single one,
    or router modules with an ``(experts, hidden)`` weight)."""
    experts: tuple[str, ...] = ()
    """Parameter names of the 3-D expert tensors."""

    def describe(self) -> str:
        parts = [f"{len(self.blocks)} blocks"]
        if self.fused:
            parts.append("fused " + ", ".join(f"{k} ({v})" for k, v in self.fused.items()))
        if self.routers:
            parts.append(f"{len(self.routers)} routers")
        return f"{self.family}: " + "; ".join(parts)


# ------------------------------------------------------------------------------------- helpers
def _family(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def _class_name(module: nn.Module) -> str:
    # FSDP2 renames the classes of the modules it shards (FSDPLlamaDecoderLayer).
    return type(module).__name__.removeprefix("FSDP")


def _is_projection(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _out_axis(module: nn.Module) -> int:
    """The weight axis of the output features: 0 for ``nn.Linear`` (out, in), 1 for GPT-2's
    ``Conv1D`` (in, out)."""
    return 0 if isinstance(module, nn.Linear) else 1


def _numel(model: nn.Module, piece: Piece) -> int:
    p = model.get_parameter(piece.param)
    cols = p.shape[-1] if p.dim() >= 2 else 1
    return index_size(piece.rows, p.numel() // cols) * index_size(piece.cols, cols)


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    try:
        return get() if get is not None else model
    except (AttributeError, NotImplementedError):
        return model


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the transformer blocks in model order.

    Raises:
        AnatomyError: no block found.
    """
    classes = {str(c) for c in (getattr(model, "_no_split_modules", None) or [])}
    blocks = [(n, m) for n, m in model.named_modules() if n and _class_name(m) in classes]
    # Keep the outermost: a block class may appear nested in another one (vision towers aside).
    blocks = [(n, m) for n, m in blocks if not any(n.startswith(o + ".") for o, _ in blocks if o != n)]
    if blocks:
        return blocks
    decoder = _decoder(model)
    prefix = next((n for n, m in model.named_modules() if m is decoder), "")
    best: list[tuple[str, nn.Module]] = []
    for name, module in decoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                full = ".".join(p for p in (prefix, name) if p)
                best = [(f"{full}.{i}", m) for i, m in enumerate(module)]
    if not best:
        raise AnatomyError(
            f"cannot find the transformer blocks of {type(model).__name__} ({_family(model)}): it declares "
            "no _no_split_modules and has no list of identical layers"
        )
    return best


def _outermost(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in named if not any(n.startswith(o + ".") for o, _ in named if o != n)]


def _attention_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in block.named_modules() if n and "attention" in _class_name(m).lower()]
    return _outermost([(n, m) for n, m in found if any(_is_projection(c) for c in m.modules())])


def _experts_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [
        (n, m)
        for n, m in block.named_modules()
        if n and any(p.dim() == 3 for p in m.parameters(recurse=False))
    ]
    return _outermost(found)


# ---------------------------------------------------------------------------------- the probe
class _StopProbeError(Exception):
    pass


@dataclass
class _Probe:
    """Hooks on one block: attention projections (leaves) and fused feed-forward candidates."""

    attention: nn.Module
    projections: dict[str, nn.Module]
    gate_up: dict[str, tuple[nn.Module, nn.Module]]  # name -> (fused layer, its down layer)
    leaves: dict[str, Tensor] = field(default_factory=dict)
    attn_out: Tensor | None = None
    masks: dict[str, Tensor] = field(default_factory=dict)
    down_in: dict[str, Tensor] = field(default_factory=dict)

    def done(self) -> bool:
        return self.attn_out is not None and len(self.down_in) == len(self.gate_up)


def _mixes(mask: Tensor) -> dict[str, Tensor]:
    """Feature masks that take pair ``i`` from token 1 where ``mask[i]``, under each layout."""
    return {"concatenated": torch.cat([mask, mask]), "interleaved": mask.repeat_interleave(2)}


def _install(probe: _Probe, generator: torch.Generator) -> list[Any]:
    handles = []

    def leaf_hook(name: str):
        # output + zeros: the gradient of this leaf is the gradient of the output, and the graph
        # through the output (to the projections before it) stays whole.
        def hook(module, args, output):
            leaf = torch.zeros_like(output, requires_grad=True)
            probe.leaves[name] = leaf
            return output + leaf

        return hook

    for name, module in probe.projections.items():
        handles.append(module.register_forward_hook(leaf_hook(name)))

    def attn_hook(module, args, output):
        probe.attn_out = output[0] if isinstance(output, tuple) else output
        if probe.done():
            raise _StopProbeError

    handles.append(probe.attention.register_forward_hook(attn_hook))

    def mix_hook(name: str):
        # Tokens 2 and 3 get token 0's output with some (gate, up) pairs taken from token 1, paired
        # as [gate; up] (token 2) or interleaved (token 3). The layer between this output and the
        # down projection is elementwise per pair, so under the true layout the down projection's
        # input of the mixed token is token 0's with those pairs' entries taken from token 1.
        def hook(module, args, output):
            y = output.detach().clone()
            mask = torch.rand(y.shape[-1] // 2, generator=generator) < 0.5
            probe.masks[name] = mask
            for pos, full in zip((2, 3), _mixes(mask).values()):
                y[0, pos] = torch.where(full.to(y.device), y[0, 1], y[0, 0])
            return y

        return hook

    def down_hook(name: str):
        def hook(module, args):
            probe.down_in[name] = args[0].detach()
            if probe.done():
                raise _StopProbeError

        return hook

    for name, (fused, down) in probe.gate_up.items():
        handles.append(fused.register_forward_hook(mix_hook(name)))
        handles.append(down.register_forward_pre_hook(down_hook(name)))
    return handles


def _token0(t: Tensor) -> Tensor:
    """Token 0's features of a ``(batch..., tokens, features)`` tensor (batch 1)."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])[0, 0]


def _classify_attention(probe: _Probe, generator: torch.Generator) -> dict[str, dict[str, list[int]]]:
    """Each attention projection's output features (token 0) by class: q, k or v.

    Gradient magnitudes are taken over several random output directions, and "zero" means below
    1e-6 of the largest (fused attention kernels leave ~1e-9 where the exact value is 0).
    """
    out = probe.attn_out.reshape(-1, probe.attn_out.shape[-2], probe.attn_out.shape[-1])
    names = list(probe.leaves)
    leaves = [probe.leaves[n] for n in names]
    mags = {(n, t): torch.zeros(probe.leaves[n].shape[-1]) for n in names for t in (0, 1)}
    for _ in range(4):
        for token in (0, 1):
            r = torch.randn(out.shape[-1], generator=generator).to(out.device, out.dtype)
            grads = torch.autograd.grad(
                (out[0, token] * r).sum(), leaves, retain_graph=True, allow_unused=True
            )
            for name, g in zip(names, grads):
                if g is not None:
                    key = (name, token)
                    mags[key] = torch.maximum(mags[key], _token0(g).detach().abs().float().cpu())
    classes: dict[str, dict[str, list[int]]] = {}
    for name in names:
        m0, m1 = mags[(name, 0)], mags[(name, 1)]
        scale = torch.maximum(m0.max(), m1.max())
        through0, through1 = m0 > 1e-6 * scale, m1 > 1e-6 * scale
        kind = {
            "q": torch.nonzero(~through0 & ~through1).flatten().tolist(),
            "k": torch.nonzero(~through0 & through1).flatten().tolist(),
            "v": torch.nonzero(through0).flatten().tolist(),
        }
        classes[name] = {k: v for k, v in kind.items() if v}
    return classes


def _gate_up_layout(mask: Tensor, h: Tensor) -> str | None:
    """The layout under which the mixed tokens' down-projection inputs are as predicted."""
    h = h.float()
    for pos, layout in zip((2, 3), _mixes(mask)):
        want = torch.where(mask.to(h.device), h[0, 1], h[0, 0])
        err = torch.linalg.vector_norm(h[0, pos] - want) / torch.linalg.vector_norm(want).clamp_min(1e-12)
        if err < 1e-2:  # the wrong layout is off by O(1)
            return layout
    return None


def _probe_block(
    model: nn.Module, attention: nn.Module, gate_up: dict[str, tuple[nn.Module, nn.Module]], seed: int = 0
) -> tuple[dict[str, dict[str, list[int]]], dict[str, str | None]]:
    """One forward of four tokens through ``model`` up to ``attention`` and the ``gate_up``
    candidates of one block; returns the q/k/v classes and the gate/up layouts."""
    generator = torch.Generator().manual_seed(seed)
    projections = {n: m for n, m in attention.named_modules() if _is_projection(m)}
    probe = _Probe(attention, projections, gate_up)
    was_training = model.training
    config = getattr(model, "config", None)
    attn_impl = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    switch = setter is not None and attn_impl not in (None, "eager")
    handles = _install(probe, generator)
    # The probed block runs in fp32 (bf16 rounding would blur the zeros): its weights are cast and
    # cast back, which is exact, and its floating inputs are cast by a pre-hook.
    block = _owner_block(model, attention)
    dtypes = {p: p.dtype for p in block.parameters()}
    for p in dtypes:
        p.data = p.data.float()
    handles.append(block.register_forward_pre_hook(_to_fp32, with_kwargs=True))
    try:
        model.eval()
        if switch:
            setter("eager")  # softmax's own backward: exact zeros where fused kernels leave ~1e-9
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, 4), generator=generator)
        device = next(model.parameters()).device
        with torch.enable_grad():
            with contextlib.suppress(_StopProbeError):
                model(input_ids=ids.to(device), use_cache=False)
            if probe.attn_out is None:
                raise AnatomyError(f"{type(attention).__name__} did not run in a forward pass of the model")
            classes = _classify_attention(probe, generator)
    finally:
        for h in handles:
            h.remove()
        for p, dtype in dtypes.items():
            p.data = p.data.to(dtype)
        if switch:
            setter(attn_impl)
        model.train(was_training)
    layouts = {
        name: _gate_up_layout(probe.masks[name], probe.down_in[name]) if name in probe.down_in else None
        for name in gate_up
    }
    return classes, layouts


def _to_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(x: Any) -> Any:
        if torch.is_tensor(x) and x.is_floating_point():
            return x.float()
        if isinstance(x, tuple):
            return tuple(cast(v) for v in x)
        return x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _owner_block(model: nn.Module, module: nn.Module) -> nn.Module:
    for _, block in find_blocks(model):
        if any(m is module for m in block.modules()):
            return block
    raise AnatomyError(f"{type(module).__name__} is in no block of the model")


def _split(classes: dict[str, list[int]]) -> dict[str, list[int]] | None:
    """The parts of a fused projection (q/k/v or k/v with equal k and v), or None if not fused."""
    if len(classes) < 2 or "k" not in classes or "v" not in classes:
        return None
    if len(classes["k"]) != len(classes["v"]):
        return None  # e.g. multi-head latent attention's compressed k/v and rope key: one matrix
    return classes


# ------------------------------------------------------------------------------ the anatomy
def _shift(index: Index, offset: int) -> Index:
    return tuple(range(r.start + offset, r.stop + offset, r.step) for r in index)


def _dims(module: nn.Module) -> tuple[int, int]:
    """(out features, in features) of a projection."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if _out_axis(module) == 0 else (w.shape[1], w.shape[0])


def _module_pieces(prefix: str, module: nn.Module, parts: Index | None = None) -> tuple[Piece, ...]:
    """The weight (and bias) of a projection, or the output features ``parts`` of them."""
    pieces = []
    for pname, p in module.named_parameters(recurse=False):
        name = f"{prefix}.{pname}"
        if parts is None:
            pieces.append(Piece(name))
        elif p.dim() == 1 or _out_axis(module) == 0:
            pieces.append(Piece(name, rows=parts))
        else:
            pieces.append(Piece(name, cols=parts))
    return tuple(pieces)


def _expert_units(model: nn.Module, prefix: str, rel: str, experts: nn.Module) -> list[tuple[Unit, ...]]:
    """One group (gate, up, down) per expert, from transformers' experts layout attributes."""
    transposed = bool(getattr(experts, "is_transposed", False))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    params = {n: p for n, p in experts.named_parameters(recurse=False) if p.dim() == 3}
    n_experts = {p.shape[0] for p in params.values()}
    if len(n_experts) != 1:
        raise AnatomyError(f"{prefix}: 3-D parameters with different expert counts {sorted(n_experts)}")
    count = n_experts.pop()
    groups: list[tuple[Unit, ...]] = []
    for e in range(count):
        units: list[Unit] = []
        for pname, p in params.items():
            a, b = p.shape[1], p.shape[2]
            out = b if transposed else a
            bias = f"{prefix}.{pname}_bias"
            has_bias = bias.rsplit(".", 1)[-1] in dict(experts.named_parameters(recurse=False))
            if pname == "gate_up_proj":
                half = out // 2
                gate = (range(0, half),) if concatenated else (range(0, out, 2),)
                up = (range(half, out),) if concatenated else (range(1, out, 2),)
                for role, idx in (("gate", gate), ("up", up)):
                    if transposed:
                        pieces = [Piece(f"{prefix}.{pname}", rows=(range(e * a, (e + 1) * a),), cols=idx)]
                    else:
                        pieces = [Piece(f"{prefix}.{pname}", rows=_shift(idx, e * a))]
                    if has_bias:
                        pieces.append(Piece(bias, rows=(range(e, e + 1),), cols=idx))
                    units.append(_unit(model, f"{rel}[{e}].{role}", pieces))
            else:
                role = pname.removesuffix("_proj")
                pieces = [Piece(f"{prefix}.{pname}", rows=(range(e * a, (e + 1) * a),))]
                if has_bias:
                    pieces.append(Piece(bias, rows=(range(e, e + 1),)))
                units.append(_unit(model, f"{rel}[{e}].{role}", pieces))
        groups.append(tuple(units))
    return groups


def _unit(model: nn.Module, name: str, pieces: Sequence[Piece]) -> Unit:
    return Unit(name, tuple(pieces), sum(_numel(model, p) for p in pieces))


def model_anatomy(model: nn.Module, *, probe: bool = True) -> Anatomy:
    """The :class:`Anatomy` of a (plain, unwrapped) transformers causal LM.

    Args:
        model: the model (not yet wrapped by FSDP or peft).
        probe: tell fused projections apart by probing (one short forward per kind of block).
            Without it, fused tensors are reported as single units.

    Raises:
        AnatomyError: no blocks, or a block without an attention module.
    """
    family = _family(model)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = find_blocks(model)
    signature_cache: dict[tuple, tuple[dict, dict]] = {}
    fused_notes: dict[str, str] = {}
    routers: list[str] = []
    expert_params: list[str] = []
    out_blocks = []
    for bname, block in blocks:
        attentions = _attention_modules(block)
        if not attentions:
            raise AnatomyError(
                f"{family}: block {bname} ({_class_name(block)}) has no module whose class name contains "
                "'Attention'; leantune cannot tell its attention matrices from its feed-forward ones"
            )
        attn_ids = {id(m) for _, am in attentions for m in am.modules()}
        experts = _experts_modules(block)
        expert_ids = {id(m) for _, em in experts for m in em.modules()}
        n_experts = {p.shape[0] for _, em in experts for p in em.parameters(recurse=False) if p.dim() == 3}
        for erel, em in experts:
            expert_params.extend(
                f"{bname}.{erel}.{n}" for n, p in em.named_parameters(recurse=False) if p.dim() == 3
            )
        if experts:  # router modules of their own (not nn.Linear): a weight of (experts, hidden)
            for rel, m in block.named_modules():
                w = getattr(m, "weight", None)
                if (
                    rel
                    and id(m) not in attn_ids | expert_ids
                    and not _is_projection(m)
                    and isinstance(w, nn.Parameter)
                    and w.dim() == 2
                    and w.shape[0] in n_experts
                ):
                    routers.append(f"{bname}.{rel}.weight")
        ffn_layers: dict[str, list[tuple[str, nn.Module]]] = {}
        for rel, m in block.named_modules():
            if not rel or id(m) in attn_ids or id(m) in expert_ids or not _is_projection(m):
                continue
            if experts and _dims(m)[0] in n_experts | {1}:
                routers.append(f"{bname}.{rel}.weight")
                continue
            parent = rel.rsplit(".", 1)[0] if "." in rel else ""
            ffn_layers.setdefault(parent, []).append((rel, m))
        gate_up: dict[str, tuple[nn.Module, nn.Module]] = {}
        for layers in ffn_layers.values():
            if len(layers) == 2:
                (ra, a), (rb, b) = layers
                if _dims(a)[0] == 2 * _dims(b)[1] and _dims(b)[0] == _dims(a)[1]:
                    gate_up[ra] = (a, b)
        # Probe once per kind of block (same projection names, classes and shapes).
        attention = attentions[0][1]
        signature = tuple(
            (rel, _class_name(m), tuple(m.weight.shape))
            for rel, m in block.named_modules()
            if _is_projection(m) and (id(m) in attn_ids or rel in gate_up)
        )
        if signature not in signature_cache:
            if probe:
                classes, layouts = _probe_block(model, attention, gate_up)
            else:
                classes, layouts = {}, dict.fromkeys(gate_up)
            signature_cache[signature] = (classes, layouts)
        classes, layouts = signature_cache[signature]
        attn_units: list[Unit] = []
        for arel, am in attentions:
            for prel, pm in am.named_modules():
                if not _is_projection(pm):
                    continue
                rel = f"{arel}.{prel}"
                prefix = f"{bname}.{rel}"
                parts = _split(classes.get(prel, {})) if am is attention else None
                if parts is None:
                    attn_units.append(_unit(model, rel, _module_pieces(prefix, pm)))
                    continue
                axis = "rows" if _out_axis(pm) == 0 else "columns"
                fused_notes[rel] = (
                    "/".join(parts) + f" by {axis} " + "/".join(str(len(v)) for v in parts.values())
                )
                for role, idx in parts.items():
                    attn_units.append(
                        _unit(model, f"{rel}[{role}]", _module_pieces(prefix, pm, _compress(idx)))
                    )
        ffn: list[tuple[Unit, ...]] = []
        for layers in ffn_layers.values():
            units: list[Unit] = []
            for rel, m in layers:
                prefix = f"{bname}.{rel}"
                layout = layouts.get(rel)
                if rel in gate_up and layout is not None:
                    width = _dims(m)[0] // 2
                    fused_notes[rel] = f"gate/up {layout}"
                    gate, up = _pairs(layout, width)
                    units.append(_unit(model, f"{rel}[gate]", _module_pieces(prefix, m, gate)))
                    units.append(_unit(model, f"{rel}[up]", _module_pieces(prefix, m, up)))
                else:
                    if rel in gate_up:
                        fused_notes[rel] = "gate/up layout not recognised: one unit"
                    units.append(_unit(model, rel, _module_pieces(prefix, m)))
            ffn.append(tuple(units))
        for erel, em in experts:
            ffn.extend(_expert_units(model, f"{bname}.{erel}", erel, em))
        out_blocks.append(BlockAnatomy(bname, tuple(attn_units), tuple(ffn)))
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embed is not None and head is not None and getattr(head, "weight", None) is embed.weight
    return Anatomy(
        family,
        tuple(out_blocks),
        names.get(id(embed)) if embed is not None else None,
        names.get(id(head)) if head is not None else None,
        tied,
        fused_notes,
        tuple(routers),
        tuple(expert_params),
    )


def _pairs(layout: str, width: int) -> tuple[Index, Index]:
    if layout == "concatenated":
        return (range(0, width),), (range(width, 2 * width),)
    return (range(0, 2 * width, 2),), (range(1, 2 * width, 2),)
