"""What a model keeps for backward, counted on fake tensors: no weights, no memory, no compute.

:mod:`leantune.estimate` needs, for any family, the parameters of every layer and the bytes autograd
saves per token in each layer's forward. Both come from the family's own modelling code run under
``torch._subclasses.FakeTensorMode``: the model is built from its config with fake parameters
(shapes and dtypes only), one forward runs on fake token ids, and ``saved_tensors_hooks`` records
every distinct storage autograd keeps (parameters excepted), attributed to the block that was
running. Two sequence lengths separate the per-token part from a per-token-squared part (eager
attention's probabilities, materialised masks).

Two differences from a real step are handled here:

* transformers takes its tracing paths under fake tensors, which build attention masks a real step
  skips. Unpadded batches (the trainer passes no mask then) are counted with transformers' mask code
  told it is not tracing, which is safe because without a padding mask it reads no tensor; padded
  batches are counted with a mask with zeros, as they run;
* the experts of MoE blocks route tokens by data (``nonzero``), which fake tensors cannot follow.
  Their forward is replaced by one that saves nothing, and what transformers' experts forward saves
  per routed token is added (counted on real forwards of its ``grouped_mm`` path, the default):
  the gathered input and the expert output (``h`` each), the ``gate_up`` output (``2 I``), the
  activation's output and the product (``I`` each), three indices and a routing weight. Each token
  is routed to ``num_experts_per_tok`` experts.

The counts were checked against real forwards of every supported family
(``tests/unit/test_footprint.py``).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch import nn

__all__ = ["LayerFootprint", "ModelFootprint", "fake_model", "model_footprint"]

_PROBE_LENGTHS = (32, 64)
_MODES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "mixed": torch.float32}


@dataclass(frozen=True)
class LayerFootprint:
    """One block: its parameters and the bytes its forward saves for backward, per sequence of
    ``L`` tokens: ``per_token * L + per_token_sq * L**2``."""

    name: str
    params: tuple[tuple[str, tuple[int, ...]], ...]
    per_token: float
    per_token_sq: float

    def saved(self, seq_len: int, batch: int = 1) -> float:
        return batch * (self.per_token * seq_len + self.per_token_sq * seq_len * seq_len)


@dataclass(frozen=True)
class ModelFootprint:
    """Every block's footprint, the rest of the model (embeddings, final norm, head input) and its
    parameters, for one dtype mode."""

    layers: tuple[LayerFootprint, ...]
    tail_per_token: float
    tail_per_token_sq: float
    root_params: tuple[tuple[str, tuple[int, ...]], ...]
    experts: bool
    cast_numel: int = 0
    """Elements of the weights bf16 autocast copies (linear layers and the head)."""
    ffn_width: int = 0
    """The widest feed-forward activation per token: a dense MLP's width, or experts per token
    times an expert's width."""

    def tail(self, seq_len: int) -> float:
        return self.tail_per_token * seq_len + self.tail_per_token_sq * seq_len * seq_len


def _config(config: Any):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("config.json has no model_type: transformers cannot tell the family")
    return AutoConfig.for_model(model_type, **data)


def fake_model(config: Any, *, dtype: torch.dtype = torch.float32, attn: str | None = "auto") -> nn.Module:
    """The causal LM of ``config`` (a transformers config or a ``config.json`` dict) with fake
    parameters. Call inside the ``FakeTensorMode`` that will run it."""
    from transformers import AutoModelForCausalLM

    from leantune.models import resolve_attention

    cfg = _config(config)
    kwargs = {"attn_implementation": resolve_attention(cfg, attn)} if attn else {}
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kwargs)


def _experts_per_token(model: nn.Module) -> int:
    cfg = model.config
    for key in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{cfg.model_type}: a MoE config without num_experts_per_tok")


def _not_tracing(*args: Any, **kwargs: Any) -> bool:
    return False


def _no_packing(position_ids: Any) -> None:
    return None


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _count(
    model: nn.Module, seq_len: int, *, padded: bool, mixed: bool, expert_bytes: float
) -> tuple[list[float], float]:
    """Saved bytes per block and outside the blocks for one sequence of ``seq_len`` tokens."""
    from leantune.anatomy import find_blocks

    blocks = find_blocks(model)
    keep = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, tuple[int, int]] = {}
    where = [-1]
    per_block = [0.0] * len(blocks)
    k = _experts_per_token(model) if expert_bytes else 0

    alive: list[torch.Tensor] = []  # a freed storage's address could be reused by a later one

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in keep and key not in seen:
            seen[key] = (where[-1], t.untyped_storage().nbytes())
            alive.append(t)
        return t

    def enter(i: int):
        def hook(module: nn.Module, args: Any) -> None:
            where.append(i)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        where.pop()

    handles = []
    for i, (_, block) in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(leave))
    with ExitStack() as stack:
        for h in handles:
            stack.callback(h.remove)
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, seq_len))
        kwargs: dict[str, Any] = {"use_cache": False}
        if padded:
            mask = torch.ones(1, seq_len, dtype=torch.long)
            mask[0, -max(1, seq_len // 4) :] = 0
            kwargs["attention_mask"] = mask
        else:
            # What a real step without a mask does: transformers' mask code consults is_tracing
            # only about tensors it would read, and with no padding mask it reads none.
            stack.enter_context(mock.patch("transformers.masking_utils.is_tracing", _not_tracing))
            # positions 0..L-1: one sequence, which is what the packing check finds for real
            stack.enter_context(
                mock.patch("transformers.masking_utils.find_packed_sequence_indices", _no_packing)
            )
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model(input_ids=ids, **kwargs)
    for block, nbytes in seen.values():
        if block >= 0:
            per_block[block] += nbytes
    tail = sum(n for b, n in seen.values() if b < 0)
    if mixed:
        # Each linear layer saves autocast's bf16 copy of its weight: booked under weights by the
        # estimate, not as activations.
        from leantune.anatomy import _is_projection

        inside = set()
        for i, (_, block) in enumerate(blocks):
            for m in block.modules():
                if _is_projection(m):
                    per_block[i] -= 2 * m.weight.numel()
                    inside.add(id(m))
        for m in model.modules():
            if _is_projection(m) and id(m) not in inside:
                tail -= 2 * m.weight.numel()
    if expert_bytes:
        for i, (_, block) in enumerate(blocks):
            if any(p.dim() == 3 for p in block.parameters()):
                per_block[i] += k * seq_len * expert_bytes
    return per_block, tail


def _replace_experts(model: nn.Module) -> tuple[list[Any], float]:
    """Experts forwards that save nothing (see the module docstring); returns the undo list and
    the bytes the real experts forward saves per routed token."""
    from leantune.anatomy import find_blocks

    undo: list[Any] = []
    per_routed = 0.0
    for _, block in find_blocks(model):
        for module in block.modules():
            params = [p for p in module.parameters(recurse=False) if p.dim() == 3]
            if not params:
                continue
            down = dict(module.named_parameters(recurse=False)).get("down_proj", params[-1])
            hidden = model.config.hidden_size
            inter = down.shape[2] if down.shape[1] == hidden else down.shape[1]
            # grouped_mm is not autocast: under mixed precision the experts compute in fp32 too
            s = down.element_size()
            per_routed = max(per_routed, s * (2 * hidden + 4 * inter) + 3 * 8 + 4)

            def forward(hidden_states, *args, **kwargs):
                return torch.zeros_like(hidden_states)

            undo.append((module, module.forward))
            module.forward = forward
    return undo, per_routed


def model_footprint(
    config: Any, dtype: str, *, padded: bool = False, attn: str | None = "auto"
) -> ModelFootprint:
    """Count what one training forward of the model of ``config`` saves, per block.

    Args:
        config: a transformers config, or the parsed ``config.json`` of a model directory.
        dtype: ``fp32``, ``bf16``, ``fp16`` or ``mixed`` (fp32 weights, bf16 autocast).
        padded: batches with padding (an attention mask with zeros).
        attn: attention implementation (``auto``: what leantune trains with).

    Raises:
        ValueError: transformers does not know the family, or a MoE config lacks its top-k.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if dtype not in _MODES:
        raise ValueError(f"Invalid dtype {dtype!r} (choose from {', '.join(_MODES)})")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = fake_model(config, dtype=_MODES[dtype], attn=attn)
        model.train()
        model.config.use_cache = False
        undo, expert_bytes = _replace_experts(model)
        try:
            counts = [
                _count(model, n, padded=padded, mixed=dtype == "mixed", expert_bytes=expert_bytes)
                for n in _PROBE_LENGTHS
            ]
        finally:
            for module, fwd in undo:
                module.forward = fwd
        from leantune.anatomy import find_blocks

        blocks = find_blocks(model)
        in_blocks = set()
        layers = []
        (l1, l2) = _PROBE_LENGTHS
        for i, (name, block) in enumerate(blocks):
            params = tuple((n, tuple(p.shape)) for n, p in block.named_parameters())
            in_blocks.update(id(p) for p in block.parameters())
            a, c = _fit(counts[0][0][i], counts[1][0][i], l1, l2)
            layers.append(LayerFootprint(name, params, a, c))
        root = tuple((n, tuple(p.shape)) for n, p in model.named_parameters() if id(p) not in in_blocks)
        ta, tc = _fit(counts[0][1], counts[1][1], l1, l2)
        cast, width = _widths(model, blocks)
    return ModelFootprint(tuple(layers), ta, tc, root, expert_bytes > 0, cast, width)


def _widths(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> tuple[int, int]:
    """(elements autocast copies, the widest feed-forward activation per token): the input width
    of the layers that project back to the hidden size (down_proj, c_proj, fc2, ...), for experts
    times the experts per token."""
    from leantune.anatomy import _attention_modules, _dims, _is_projection

    hidden = model.config.hidden_size
    cast = sum(m.weight.numel() for m in model.modules() if _is_projection(m))
    width = 0
    for _, block in blocks:
        attention = {id(m) for _, a in _attention_modules(block) for m in a.modules()}
        for m in block.modules():
            if _is_projection(m) and id(m) not in attention:
                out, inp = _dims(m)
                if out == hidden and inp != hidden:
                    width = max(width, inp)
            down = dict(m.named_parameters(recurse=False)).get("down_proj")
            if down is not None and down.dim() == 3:  # experts: (E, hidden, I), or transposed
                inter = down.shape[2] if down.shape[1] == hidden else down.shape[1]
                width = max(width, _experts_per_token(model) * inter)
    # no projection back from another width: the feed-forward layers are as wide as the stream
    return cast, width or hidden


def _fit(b1: float, b2: float, l1: int, l2: int) -> tuple[float, float]:
    """``(a, c)`` with ``b(L) = a L + c L^2`` through the two counts (``c >= 0``)."""
    c = max(0.0, (b2 / l2 - b1 / l1) / (l2 - l1))
    a = b1 / l1 - c * l1
    if a < 0:  # cannot happen for real counts; keep the estimate conservative if it did
        a, c = max(b1 / l1, b2 / l2), 0.0
    return a, c


def parameter_count(footprint: ModelFootprint) -> int:
    """Distinct parameter elements (tied weights once)."""
    total = sum(math.prod(s) for layer in footprint.layers for _, s in layer.params)
    return total + sum(math.prod(s) for _, s in footprint.root_params)
