"""Segments: parts of one parameter that a fused optimizer updates as tensors of their own.

A fused tensor holds several matrices: Phi-3's ``qkv_proj`` is q, k and v stacked by rows, GPT-2's
``c_attn`` by columns, GPT-NeoX's ``query_key_value`` interleaves them head by head, a MoE
``gate_up_proj`` holds two matrices per expert. When only some of them train (half fine-tuning),
the optimizer is given the trainable ones as :class:`Segment` s: each is updated exactly as if it
were a separate parameter (its own statistics, step count and RMS; AdaLomo's row and column
factors are those of the sub-matrix), and the rest of the tensor is never written and keeps no
optimizer state.

Indices refer to the ``(prod(shape[:-1]), shape[-1])`` view of the parameter (a vector's elements
are its rows). A segment that is one contiguous run of whole rows is updated in place through a
view; any other is gathered into a contiguous copy, updated, and written back (exact: the copy has
the parameter's dtype). Under FSDP2 each rank updates the part of a segment that lies in its shard
of rows (possibly none) and takes part in the segment's collectives all the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Index",
    "LocalSegment",
    "Segment",
    "SegmentState",
    "compress_index",
    "index_size",
    "index_tensor",
    "segment_key",
    "split_segment_key",
]

Index = tuple[range, ...]
"""A set of indices as disjoint ranges (unit or other stride), in increasing order."""

_SEP = "|"  # between a segment's name and its state key: "self_attn.qkv_proj[q]|row"


def index_size(index: Index | None, full: int) -> int:
    """Number of indices in ``index`` (``full`` for ``None``, meaning all)."""
    return full if index is None else sum(len(r) for r in index)


def index_tensor(index: Index, device: torch.device | str | None = None) -> Tensor:
    """The indices of ``index`` as a LongTensor."""
    if not index:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(r.start, r.stop, r.step, device=device) for r in index])


def compress_index(indices: Sequence[int]) -> Index:
    """Increasing integers as maximal runs of consecutive values."""
    out: list[range] = []
    start = prev = None
    for i in indices:
        if start is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            out.append(range(start, prev + 1))
        start = prev = i
    if start is not None:
        out.append(range(start, prev + 1))
    return tuple(out)


def _clip(index: Index, lo: int, hi: int) -> Index:
    """The indices of ``index`` in ``[lo, hi)``, shifted by ``-lo``."""
    out = []
    for r in index:
        first = r.start if r.start >= lo else r.start + math.ceil((lo - r.start) / r.step) * r.step
        part = range(first, min(r.stop, hi), r.step)
        if len(part):
            out.append(range(part.start - lo, part.stop - lo, part.step))
    return tuple(out)


def _as_slice(index: Index | None) -> slice | None:
    if index is None:
        return slice(None)
    if len(index) == 1:
        r = index[0]
        return slice(r.start, r.stop, r.step)
    return None


@dataclass(frozen=True)
class Segment:
    """A part of a parameter that is updated as a tensor of its own.

    Attributes:
        name: unique among the segments of the parameter; it names the segment's optimizer state.
        rows: rows of the ``(prod(shape[:-1]), shape[-1])`` view (``None``: all).
        cols: columns of that view (``None``: all).
    """

    name: str
    rows: Index | None = None
    cols: Index | None = None

    def __post_init__(self) -> None:
        if not self.name or _SEP in self.name:
            raise ValueError(f"Invalid segment name {self.name!r} (non-empty, without {_SEP!r})")
        for what, index in (("rows", self.rows), ("cols", self.cols)):
            if index is None:
                continue
            if (
                not index
                or any(len(r) == 0 or r.step < 1 for r in index)
                # each run starts after the last index of the one before: increasing, no index twice
                or any(b.start <= a[-1] for a, b in zip(index, index[1:]))
            ):
                raise ValueError(f"segment {self.name!r}: {what} must be non-empty increasing ranges")

    def shape(self, param_shape: Sequence[int]) -> torch.Size:
        """The segment's shape: (rows, cols) for matrices, (elements,) for vectors."""
        if len(param_shape) < 2:
            if self.cols not in (None, (range(0, 1),)):
                raise ValueError(f"segment {self.name!r}: a vector has no columns to select")
            return torch.Size([index_size(self.rows, math.prod(param_shape))])
        cols = param_shape[-1]
        rows = math.prod(param_shape) // cols
        return torch.Size([index_size(self.rows, rows), index_size(self.cols, cols)])

    def check(self, param_shape: Sequence[int]) -> None:
        """Raise ``ValueError`` if the segment does not fit a parameter of ``param_shape``."""
        n_cols = param_shape[-1] if len(param_shape) >= 2 else 1
        n_rows = math.prod(param_shape) // n_cols
        for what, index, n in (("rows", self.rows, n_rows), ("cols", self.cols, n_cols)):
            if index is not None and index[-1].stop > n:
                raise ValueError(
                    f"segment {self.name!r}: {what} up to {index[-1].stop} do not fit a parameter "
                    f"of shape {tuple(param_shape)}"
                )
        self.shape(param_shape)


def _overlaps(a: Segment, b: Segment, shape: Sequence[int]) -> bool:
    n_cols = shape[-1] if len(shape) >= 2 else 1
    n_rows = math.prod(shape) // n_cols

    def hits(x: Index | None, y: Index | None, n: int) -> bool:
        sx = set(range(n)) if x is None else {i for r in x for i in r}
        sy = set(range(n)) if y is None else {i for r in y for i in r}
        return bool(sx & sy)

    return hits(a.rows, b.rows, n_rows) and hits(a.cols, b.cols, n_cols)


def check_segments(segments: Sequence[Segment], shape: Sequence[int]) -> None:
    """Raise ``ValueError`` unless the segments fit ``shape``, have distinct names and are disjoint."""
    names = [s.name for s in segments]
    if len(set(names)) != len(names):
        raise ValueError(f"segment names must be unique, got {names}")
    for s in segments:
        s.check(shape)
    for i, a in enumerate(segments):
        for b in segments[i + 1 :]:
            if _overlaps(a, b, shape):
                raise ValueError(f"segments {a.name!r} and {b.name!r} overlap")


def segment_key(segment: str, key: str) -> str:
    """The optimizer-state key of ``key`` of ``segment``."""
    return f"{segment}{_SEP}{key}"


def split_segment_key(key: str) -> tuple[str | None, str]:
    """``(segment, key)`` of an optimizer-state key (``segment`` is ``None`` for a whole tensor).

    The first separator ends the segment's name (names cannot contain it); the key after it may."""
    if _SEP in key:
        seg, _, rest = key.partition(_SEP)
        return seg, rest
    return None, key


class SegmentState(MutableMapping):
    """The optimizer state of one segment: a view of the parameter's state dict whose keys are
    prefixed with the segment's name (so ``state_dict()`` stays a flat dict per parameter)."""

    __slots__ = ("_state", "_prefix")

    def __init__(self, state: dict[str, Any], segment: str) -> None:
        self._state = state
        self._prefix = segment + _SEP

    def __getitem__(self, key: str) -> Any:
        return self._state[self._prefix + key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._state[self._prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self._prefix)
        return (k[n:] for k in list(self._state) if isinstance(k, str) and k.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def row_range(param: Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the rows of the ``(prod(shape[:-1]), shape[-1])`` view held by this rank
    (all of them unless ``param`` is a DTensor sharded on dim 0)."""
    return rank_row_ranges(param)[_rank(param)]


def _rank(param: Tensor) -> int:
    mesh = getattr(param, "device_mesh", None)
    return 0 if mesh is None else mesh.get_local_rank()


def rank_row_ranges(param: Tensor) -> list[tuple[int, int]]:
    """The row range of every rank (FSDP2 shards dim 0 as ``torch.chunk`` does)."""
    shape = param.shape
    per_dim0 = math.prod(shape[1:-1]) if len(shape) >= 2 else 1
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return [(0, shape[0] * per_dim0)]
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"segments of a DTensor need a 1-D mesh and Shard(0), got {placements} on a {mesh.ndim}-D mesh"
        )
    world = mesh.size()
    chunk = math.ceil(shape[0] / world)
    ranges = [
        (min(r * chunk, shape[0]) * per_dim0, min((r + 1) * chunk, shape[0]) * per_dim0) for r in range(world)
    ]
    lo, hi = ranges[mesh.get_local_rank()]
    local = param.to_local()
    if (local.shape[0] if local.dim() else 1) * per_dim0 != hi - lo:
        raise ValueError(f"unexpected shard of {tuple(shape)}: local {tuple(local.shape)}")
    return ranges


class LocalSegment:
    """A segment restricted to this rank's rows: how to read and write it in the local tensor."""

    def __init__(self, segment: Segment, param: Tensor) -> None:
        self.segment = segment
        self.global_shape = segment.shape(param.shape)
        self.vector = param.dim() < 2
        lo, hi = row_range(param)
        n_rows = math.prod(param.shape) // (param.shape[-1] if param.dim() >= 2 else 1)
        rows = segment.rows if segment.rows is not None else (range(0, n_rows),)
        self.rows: Index = _clip(rows, lo, hi)
        self.n_rows = index_size(self.rows, 0)
        self.cols = segment.cols
        self._row_slice = _as_slice(self.rows) if self.rows else slice(0, 0)
        self._col_slice = _as_slice(self.cols)
        # In place when the segment is a run of whole rows: a contiguous view of the tensor.
        self.in_place = self.cols is None and (
            not self.rows or (len(self.rows) == 1 and self.rows[0].step == 1)
        )
        self._row_idx: Tensor | None = None
        self._col_idx: Tensor | None = None
        # every rank's local row count, in rank order (for gathering state under FSDP)
        self.rank_rows = [index_size(_clip(rows, a, b), 0) for a, b in rank_row_ranges(param)]

    def _rows2d(self, t: Tensor) -> Tensor:
        return t.view(-1, 1) if self.vector else t.view(-1, t.shape[-1])

    def _indices(self, device: torch.device) -> tuple[Any, Any]:
        r = self._row_slice
        if r is None:
            if self._row_idx is None or self._row_idx.device != device:
                self._row_idx = index_tensor(self.rows, device)
            r = self._row_idx
        c = self._col_slice
        if c is None:
            if self._col_idx is None or self._col_idx.device != device:
                self._col_idx = index_tensor(self.cols, device)
            c = self._col_idx
        return r, c

    def _shape(self, local_cols: int) -> torch.Size:
        if self.vector:
            return torch.Size([self.n_rows])
        return torch.Size([self.n_rows, index_size(self.cols, local_cols)])

    def _select(self, rows2d: Tensor) -> tuple[Any, Any]:
        r, c = self._indices(rows2d.device)
        if torch.is_tensor(r) and torch.is_tensor(c):
            return r[:, None], c[None, :]
        return r, c

    def read(self, local: Tensor) -> Tensor:
        """The segment's part of ``local`` (a view when in place, else a contiguous copy)."""
        rows2d = self._rows2d(local)
        shape = self._shape(rows2d.shape[1])
        if self.n_rows == 0:
            return local.new_empty(shape)
        if self.in_place:
            return rows2d[self._row_slice].view(shape)
        rows, cols = self._select(rows2d)
        part = rows2d[rows, cols]
        if isinstance(rows, slice) and isinstance(cols, slice):  # a view: copy it
            part = part.clone(memory_format=torch.contiguous_format)
        return part.contiguous().view(shape)

    def write(self, local: Tensor, value: Tensor) -> None:
        """Write ``value`` (from :meth:`read`, updated) back into ``local`` (no-op in place)."""
        if self.in_place or self.n_rows == 0:
            return
        rows2d = self._rows2d(local)
        rows2d[self._select(rows2d)] = value.view(self.n_rows, -1)
