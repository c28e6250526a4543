"""LongCache (ReAttention, Liu et al., ICLR 2025): attend beyond the training length without leaving it.

Every key and value is cached. Per layer and per query block (a prefill chunk, or one decoded
token), once more than ``global_size + local_size`` tokens have been seen:

1. position-free scores ``s = q . k`` of every query head against the middle keys
   ``[global_size, n - local_size)``, both with the rotary embedding taken off;
2. each query head's ``topk`` keys per query, unioned; if more than ``clip`` remain, the most
   frequently chosen (ties: the earlier);
3. each index widened to a span ``[i - span // 2, i + span // 2)``, clamped to the middle, unioned
   and sorted back into the original order; the selection is shared by the heads of a layer;
4. attention over ``[global; selected; local]`` with positions re-assigned ``0 .. L - 1`` and the
   queries at the last ``q_len`` of them, causally - so no position exceeds
   ``global_size + clip * span + local_size - 1``, which is checked to stay below the training length.

While the context fits (``n <= global_size + local_size``) the model's own attention runs unchanged,
so the result is exactly full attention.

Note:
    The reference stores keys without rotary embedding and rotates after selection. Here the cache
    is transformers' ``DynamicCache`` with the model's own (rotated) keys, and the rotation is
    changed afterwards: RoPE rotates each frequency pair by ``position * inv_freq``, so a key rotated
    at position ``p`` is rotated at ``p'`` by one more rotation by ``p' - p``, and the position-free
    key by a rotation by ``-p``. That keeps the fits case bit-exact, needs no patch of the attention
    forward, and costs ``O(n * D)`` per block - below the ``O(H * q * n * D)`` of the scores. The
    reference also trims the local window so the middle is a multiple of 128 (a kernel detail), which
    is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LongCacheConfig", "LongCacheHook", "prefill"]


@dataclass(frozen=True)
class LongCacheConfig:
    """LongCache's windows (the ``--kv-global``, ``--kv-local``, ... options).

    Defaults are the reference's CPU setting for a model trained at 256 tokens:
    ``4 + 15 * 8 + 128 = 252 < 256``.
    """

    global_size: int = 4
    """First tokens always attended (``--kv-global``)."""
    local_size: int = 128
    """Last tokens always attended, the query block among them (``--kv-local``)."""
    span: int = 8
    """Tokens attended around each selected middle key (``--kv-span``)."""
    topk: int = 2
    """Middle keys chosen per query and head (``--kv-topk``; 0 = global + local only)."""
    clip: int = 15
    """At most this many chosen keys per block (``--kv-clip``)."""
    chunk: int = 64
    """Prefill block size after the first ``global + local`` tokens (``--kv-chunk``)."""

    def __post_init__(self) -> None:
        for name, value, low in (
            ("global", self.global_size, 0),
            ("local", self.local_size, 1),
            ("span", self.span, 1),
            ("topk", self.topk, 0),
            ("clip", self.clip, 0),
            ("chunk", self.chunk, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--kv-{name} must be an int >= {low}, got {value!r}")
        if self.chunk > self.local_size:
            raise ValueError(
                f"--kv-chunk {self.chunk} exceeds --kv-local {self.local_size}: a prefill block must fit "
                "in the local window"
            )

    @property
    def max_attended(self) -> int:
        """The most keys one query attends: ``global + clip * span + local``."""
        return self.global_size + self.clip * self.span + self.local_size

    def check(self, train_length: int) -> None:
        """Raises ``ValueError`` if attention could reach position ``train_length`` or beyond."""
        if self.max_attended > train_length:
            raise ValueError(
                f"--kv-global + --kv-clip * --kv-span + --kv-local = {self.global_size} + "
                f"{self.clip} * {self.span} + {self.local_size} = {self.max_attended} exceeds the training "
                f"length {train_length}: positions would leave it"
            )


def _rotate(x: torch.Tensor, angle_pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., L, D)`` by ``angle_pos (L,)`` positions, in transformers' rotate-half layout."""
    freqs = angle_pos.to(torch.float32)[:, None] * inv_freq.to(device=x.device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _find_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            return inv
    raise ValueError(
        "--kv-policy longcache needs a model with rotary position embeddings (no inv_freq found)"
    )


class LongCacheHook:
    """The attention hook for :func:`leantune.kvcache.cache.attach` that runs LongCache.

    Args:
        model: the causal LM (its rotary ``inv_freq`` is read once).
        config: the windows.
        train_length: the longest position the model saw in training (default: the config's
            ``max_position_embeddings``).

    ``last`` holds, per layer index, the latest block's ``selected`` middle indices (original
    positions, sorted) and ``max_position`` used; ``max_position`` is the highest position any
    block has used so far. Both are for tests and inspection.
    """

    def __init__(
        self, model: torch.nn.Module, config: LongCacheConfig, train_length: int | None = None
    ) -> None:
        self.config = config
        self.train_length = int(train_length or model.config.max_position_embeddings)
        config.check(self.train_length)
        self.inv_freq = _find_inv_freq(model)
        self.last: dict[int, dict[str, Any]] = {}
        self.max_position = -1

    def _record(self, layer_idx: int, selected: torch.Tensor | None, max_position: int) -> None:
        self.last[layer_idx] = {"selected": selected, "max_position": max_position}
        self.max_position = max(self.max_position, max_position)

    def __call__(self, fn, module, query, key, value, attention_mask, scaling=None, **kwargs):
        cfg = self.config
        n, q_len = key.shape[2], query.shape[2]
        if n <= cfg.global_size + cfg.local_size:
            self._record(module.layer_idx, None, n - 1)
            return fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if q_len > cfg.local_size:
            raise ValueError(
                f"a block of {q_len} queries does not fit --kv-local {cfg.local_size}: prefill with "
                "leantune.kvcache.longcache.prefill"
            )
        scale = scaling if scaling is not None else module.scaling
        outs = [
            self._attend(query[b : b + 1], key[b : b + 1], value[b : b + 1], scale, module)
            for b in range(key.shape[0])
        ]
        return torch.cat(outs, dim=0), None

    def select(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Sorted, unique original positions of the middle keys one block attends (batch of one).

        ``query (1, H, q, D)`` and ``key (1, G, n, D)`` carry the model's rotary embedding at
        positions ``n - q .. n - 1`` and ``0 .. n - 1``.
        """
        cfg = self.config
        n, q_len, h, g = key.shape[2], query.shape[2], query.shape[1], key.shape[1]
        lo, hi = cfg.global_size, n - cfg.local_size
        m = hi - lo
        if cfg.topk == 0 or cfg.clip == 0 or m <= 0:
            return torch.empty(0, dtype=torch.long, device=key.device)
        pos = torch.arange(n, device=key.device)
        q0 = _rotate(query.float(), -pos[n - q_len :], self.inv_freq)  # position-free queries
        k0 = _rotate(key[:, :, lo:hi].float(), -pos[lo:hi], self.inv_freq)  # and middle keys
        # every query head of a group is a query of its KV head: (1, G, H/G, q, m)
        s = torch.einsum("bgrqd,bgmd->bgrqm", q0.view(1, g, h // g, q_len, -1), k0)
        top = s.topk(min(cfg.topk, m), dim=-1).indices.reshape(-1)
        counts = torch.bincount(top, minlength=m)
        chosen = counts.nonzero().squeeze(1)
        if chosen.numel() > cfg.clip:  # most frequent first, the earlier on ties
            rank = counts[chosen] * (m + 1) + (m - chosen)
            chosen = chosen[rank.topk(cfg.clip).indices]
        keep = torch.zeros(m, dtype=torch.bool, device=key.device)
        half = cfg.span // 2
        for i in chosen.tolist():
            keep[max(i - half, 0) : min(i - half + cfg.span, m)] = True
        return keep.nonzero().squeeze(1) + lo

    def _attend(self, query, key, value, scale, module) -> torch.Tensor:
        cfg = self.config
        n, q_len, h, g = key.shape[2], query.shape[2], query.shape[1], key.shape[1]
        selected = self.select(query, key)
        dev = key.device
        orig = torch.cat(
            [
                torch.arange(cfg.global_size, device=dev),
                selected,
                torch.arange(n - cfg.local_size, n, device=dev),
            ]
        )
        length = orig.numel()
        new = torch.arange(length, device=dev)
        k = _rotate(key[:, :, orig], new - orig, self.inv_freq)
        v = value[:, :, orig]
        shift = torch.full((q_len,), length - n, device=dev)
        q = _rotate(query, shift, self.inv_freq)
        # queries sit at new positions length - q_len .. length - 1 and see keys at or before them
        visible = new[None, :] <= (length - q_len + torch.arange(q_len, device=dev))[:, None]
        k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
        self._record(module.layer_idx, selected, length - 1)
        return out.transpose(1, 2).contiguous()


@torch.no_grad()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor, cache, config: LongCacheConfig) -> Any:
    """Feed ``input_ids (B, n)`` into ``cache`` in LongCache's blocks; returns the last output.

    The first block is ``global + local`` tokens (plain attention), then blocks of ``chunk``. Run it
    inside :func:`leantune.kvcache.cache.attach` with a :class:`LongCacheHook`.
    """
    n = input_ids.shape[1]
    first = min(n, config.global_size + config.local_size)
    bounds = [0, first, *range(first + config.chunk, n, config.chunk), n]
    out = None
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            out = model(input_ids=input_ids[:, start:end], cache=cache, use_cache=True, logits_to_keep=1)
    return out
