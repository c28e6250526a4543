"""Optimizer segments: a part of a tensor updated as a tensor of its own. Oracle: the same parts as
separate parameters, with the same gradients (the loss is a sum of one term per part)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from leantune.optim import LOMO, AdaLomo, InBackward
from leantune.optim.segments import LocalSegment, Segment, check_segments, compress_index, index_tensor

ROWS, COLS = 12, 10
# rows by runs, strided rows, columns, a block: what fused layouts produce
SEGMENTS = [
    Segment("runs", rows=(range(0, 2), range(6, 7))),
    Segment("strided", rows=(range(3, 12, 6),)),
    Segment("cols", rows=(range(2, 3), range(4, 6), range(7, 9), range(10, 11)), cols=(range(0, 4),)),
    Segment("block", rows=(range(10, 11),), cols=(range(5, 10),)),
]


def _index(seg: Segment, n_rows: int, n_cols: int):
    rows = index_tensor(seg.rows) if seg.rows is not None else torch.arange(n_rows)
    cols = index_tensor(seg.cols) if seg.cols is not None else torch.arange(n_cols)
    return rows[:, None], cols[None, :]


def _losses(parts: list[torch.Tensor], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    total = 0.0
    for p in parts:
        target = torch.randn(p.shape, generator=g)
        total = total + ((p * target).sin() * (1 + step)).sum()
    return total


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: AdaLomo(ps, lr=0.1),
        lambda ps: AdaLomo(ps, lr=0.1, clip_grad_norm=1.0, accumulation_steps=2),
        lambda ps: LOMO(ps, lr=0.1, clip_grad_value=0.5),
        lambda ps: InBackward(torch.optim.Adam, ps, lr=1e-2),
    ],
    ids=["adalomo", "adalomo-clip-accum", "lomo", "adam-in-backward"],
)
def test_segments_update_like_separate_parameters(make):
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(ROWS, COLS))
    bias = torch.nn.Parameter(torch.randn(ROWS))
    bias_seg = Segment("b", rows=(range(1, 9, 2),))
    separate = [torch.nn.Parameter(full.detach()[_index(s, ROWS, COLS)].clone()) for s in SEGMENTS]
    separate.append(torch.nn.Parameter(bias.detach()[index_tensor(bias_seg.rows)].clone()))
    before = full.detach().clone()
    opt = make([full, bias])
    opt.set_segments({full: SEGMENTS, bias: [bias_seg]})
    ref = make(separate)
    for step in range(6):
        parts = [full[_index(s, ROWS, COLS)] for s in SEGMENTS] + [bias[index_tensor(bias_seg.rows)]]
        opt.backward(_losses(parts, step))
        ref.backward(_losses(list(separate), step))
    for s, p in zip(SEGMENTS, separate):
        torch.testing.assert_close(full.detach()[_index(s, ROWS, COLS)], p.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias.detach()[index_tensor(bias_seg.rows)], separate[-1].detach())
    # what no segment covers is never written
    covered = torch.zeros(ROWS, COLS, dtype=torch.bool)
    for s in SEGMENTS:
        covered[_index(s, ROWS, COLS)] = True
    assert torch.equal(full.detach()[~covered], before[~covered])


def test_set_segments_validates_and_keeps_the_state_of_unchanged_segments():
    p = torch.nn.Parameter(torch.randn(ROWS, COLS))
    opt = AdaLomo([("w", p)], lr=0.1)
    with pytest.raises(ValueError, match="no parameter named 'x'"):
        opt.set_segments({"x": SEGMENTS})
    with pytest.raises(ValueError, match="overlap"):
        opt.set_segments({"w": [Segment("a", rows=(range(0, 4),)), Segment("b", rows=(range(3, 5),))]})
    with pytest.raises(ValueError, match="do not fit"):
        opt.set_segments({"w": [Segment("a", rows=(range(0, 13),))]})
    with pytest.raises(ValueError, match="unique"):
        opt.set_segments({"w": [Segment("a", rows=(range(0, 1),)), Segment("a", rows=(range(2, 3),))]})
    with pytest.raises(ValueError, match="increasing"):
        Segment("a", rows=(range(4, 6), range(0, 2)))
    with pytest.raises(ValueError, match="without"):
        Segment("a|b")
    with pytest.raises(ValueError, match="does not hold"):
        opt.set_segments({torch.nn.Parameter(torch.zeros(2)): SEGMENTS})
    opt.set_segments({"w": SEGMENTS[:2]})
    opt.backward((p * torch.randn(ROWS, COLS)).sum())
    kept = {k for k in opt.state[p] if k.startswith("runs|")}
    assert kept and {k.split("|")[0] for k in opt.state[p]} == {"runs", "strided"}
    opt.set_segments({"w": [SEGMENTS[0], SEGMENTS[2]]})  # 'strided' goes, 'runs' stays
    assert {k.split("|")[0] for k in opt.state[p]} == {"runs"}
    opt.set_segments({"w": None})  # the whole tensor again: segment state dropped
    assert not opt.state[p]
    opt.backward((p * torch.randn(ROWS, COLS)).sum())
    assert set(opt.state[p]) == {"step", "row", "col"}


def test_segment_state_round_trips_through_state_dict():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(ROWS, COLS))
    opt = AdaLomo([("w", p)], lr=0.1)
    opt.set_segments({"w": SEGMENTS})
    for step in range(2):
        opt.backward(_losses([p], step))
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    again = AdaLomo([("w", q)], lr=0.1)
    again.set_segments({"w": SEGMENTS})
    again.load_state_dict(sd)
    for step in range(2, 4):
        opt.backward(_losses([p], step))
        again.backward(_losses([q], step))
    assert torch.equal(p, q)


def test_frozen_parts_of_bf16_tensors_stay_bitwise_with_stochastic_rounding():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(ROWS, COLS).bfloat16())
    before = p.detach().clone()
    opt = AdaLomo([p], lr=1e-3, rounding="stochastic")
    opt.set_segments({p: [SEGMENTS[2]]})
    for step in range(3):
        opt.backward(_losses([p.float()], step))
    rows, cols = _index(SEGMENTS[2], ROWS, COLS)
    mask = torch.zeros(ROWS, COLS, dtype=torch.bool)
    mask[rows, cols] = True
    assert torch.equal(p.detach()[~mask], before[~mask])
    assert not torch.equal(p.detach()[mask], before[mask])


def test_local_segment_reads_views_for_row_runs_and_copies_otherwise():
    t = torch.arange(ROWS * COLS, dtype=torch.float32).view(ROWS, COLS)
    run = LocalSegment(Segment("r", rows=(range(2, 5),)), t)
    assert run.in_place and run.read(t).data_ptr() == t[2].data_ptr()
    cols = LocalSegment(SEGMENTS[2], t)
    copy = cols.read(t)
    assert not cols.in_place and copy.is_contiguous() and copy.shape == (6, 4)
    copy.fill_(-1)
    cols.write(t, copy)
    assert (t[_index(SEGMENTS[2], ROWS, COLS)] == -1).all() and (t >= 0).sum() == ROWS * COLS - 24
    assert compress_index([0, 1, 2, 5, 6, 9]) == (range(0, 3), range(5, 7), range(9, 10))
    check_segments(SEGMENTS, (ROWS, COLS))


# ------------------------------------------------------------ index arithmetic, by brute force
def _flat(index):
    return [i for r in index for i in r]


INDEXES = [(range(0, 3),), (range(1, 9, 3),), (range(0, 2), range(4, 11, 2)), (range(5, 6), range(7, 20, 5))]


@pytest.mark.parametrize("index", INDEXES, ids=str)
@pytest.mark.parametrize(("lo", "hi"), [(0, 20), (0, 1), (2, 7), (3, 4), (6, 20), (19, 25), (4, 4)])
def test_clip_keeps_exactly_the_indices_in_the_window_shifted(index, lo, hi):
    from leantune.optim.segments import _clip

    got = _clip(index, lo, hi)
    assert _flat(got) == [i - lo for i in _flat(index) if lo <= i < hi]
    assert all(len(r) > 0 for r in got)  # no empty pieces


@pytest.mark.parametrize("index", [(), *INDEXES], ids=str)
def test_index_tensor_lists_the_indices_in_order(index):
    from leantune.optim.segments import index_tensor

    t = index_tensor(index, "cpu")
    assert t.dtype == torch.long and t.device.type == "cpu" and t.tolist() == _flat(index)


def test_overlap_is_any_shared_element_of_the_matrix_view():
    from leantune.optim.segments import Segment, _overlaps, check_segments

    shape = (2, 5, 6)  # a (10, 6) view
    segs = [
        Segment("a", rows=(range(0, 4),)),
        Segment("b", rows=(range(4, 10),), cols=(range(0, 3),)),
        Segment("c", rows=(range(4, 10),), cols=(range(3, 6),)),
        Segment("d", rows=(range(3, 5),), cols=(range(2, 4),)),
        Segment("e", cols=(range(5, 6),)),
        Segment("f", rows=(range(1, 10, 2),), cols=(range(0, 1),)),
    ]

    def cells(s):
        rows = _flat(s.rows) if s.rows is not None else range(10)
        cols = _flat(s.cols) if s.cols is not None else range(6)
        return {(r, c) for r in rows for c in cols}

    for i, a in enumerate(segs):
        for b in segs[i + 1 :]:
            assert _overlaps(a, b, shape) == bool(cells(a) & cells(b)), (a.name, b.name)
    check_segments(segs[:3], shape)
    with pytest.raises(ValueError, match=r"^segments 'a' and 'd' overlap$"):
        check_segments([*segs[:3], segs[3]], shape)
    with pytest.raises(ValueError, match=r"^segment names must be unique, got \['a', 'a'\]$"):
        check_segments([segs[0], Segment("a", rows=(range(5, 6),))], shape)
    # a vector's one "column"
    assert _overlaps(Segment("x", rows=(range(0, 2),)), Segment("y", rows=(range(1, 3),)), (4,))
    assert not _overlaps(Segment("x", rows=(range(0, 2),)), Segment("y", rows=(range(2, 3),)), (4,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "Invalid segment name ''"),
        ({"name": "a|b"}, "Invalid segment name 'a|b'"),
        ({"name": "s", "rows": ()}, "segment 's': rows must be non-empty increasing ranges"),
        ({"name": "s", "cols": (range(2, 2),)}, "segment 's': cols must be non-empty increasing ranges"),
        ({"name": "s", "rows": (range(0, 4, -1),)}, "segment 's': rows must be non-empty increasing ranges"),
        ({"name": "s", "rows": (range(4, 0, -1),)}, "segment 's': rows must be non-empty increasing ranges"),
        ({"name": "s", "rows": (range(0, 4, 2), range(2, 3))}, "segment 's': rows must be non-empty"),
        ({"name": "s", "rows": (range(4, 6), range(0, 2))}, "segment 's': rows must be non-empty increasing"),
        ({"name": "s", "rows": (range(0, 6), range(3, 8))}, "segment 's': rows must be non-empty increasing"),
    ],
)
def test_bad_segments_are_refused(kwargs, message):
    from leantune.optim.segments import Segment

    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        Segment(**kwargs)


def test_segment_shapes_and_fit():
    from leantune.optim.segments import Segment

    assert Segment("s", rows=(range(0, 2), range(5, 8))).shape((4, 3, 6)) == torch.Size([5, 6])
    assert Segment("s", cols=(range(1, 5, 2),)).shape((4, 6)) == torch.Size([4, 2])
    assert Segment("s", rows=(range(2, 5),)).shape((9,)) == torch.Size([3])
    assert Segment("s", rows=(range(2, 5),), cols=(range(0, 1),)).shape((9,)) == torch.Size([3])
    with pytest.raises(ValueError, match=r"^segment 's': a vector has no columns to select$"):
        Segment("s", cols=(range(0, 2),)).shape((9,))
    Segment("s", rows=(range(0, 12),), cols=(range(0, 6),)).check((4, 3, 6))  # fits exactly
    with pytest.raises(
        ValueError, match=r"^segment 's': rows up to 13 do not fit a parameter of shape \(4, 3, 6\)$"
    ):
        Segment("s", rows=(range(0, 13),)).check((4, 3, 6))
    with pytest.raises(
        ValueError, match=r"^segment 's': cols up to 7 do not fit a parameter of shape \(4, 6\)$"
    ):
        Segment("s", cols=(range(6, 7),)).check((4, 6))
    with pytest.raises(
        ValueError, match=r"^segment .s.: cols up to 2 do not fit a parameter of shape \(9,\)$"
    ):
        Segment("s", cols=(range(0, 2),)).check((9,))


def test_segment_state_is_the_prefixed_part_of_the_state():
    from leantune.optim.segments import SegmentState

    state = {"step": 3, "q|row": 1, "q|col": 2, "k|row": 4, 7: "not a string key"}
    view = SegmentState(state, "q")
    assert sorted(view) == ["col", "row"] and len(view) == 2 and dict(view) == {"row": 1, "col": 2}
    view["v"] = 5
    del view["row"]
    assert state == {"step": 3, "q|col": 2, "k|row": 4, 7: "not a string key", "q|v": 5}


# --------------------------------------------------- FSDP2 row ranges, without a process group
class _Mesh:
    def __init__(self, rank, world, ndim=1):
        self.rank, self.world, self.ndim = rank, world, ndim

    def get_local_rank(self):
        return self.rank

    def size(self):
        return self.world


class _Sharded:
    """What rank_row_ranges reads of a DTensor sharded on dim 0: shape, mesh, placements, to_local."""

    def __init__(self, shape, rank, world, placements=None, local_rows=None):
        from torch.distributed.tensor import Shard

        self.shape = torch.Size(shape)
        self.device_mesh = _Mesh(rank, world)
        self.placements = placements if placements is not None else (Shard(0),)
        chunks = torch.chunk(torch.empty(shape), world)  # FSDP2 shards dim 0 as torch.chunk does
        rows = local_rows if local_rows is not None else (chunks[rank].shape[0] if rank < len(chunks) else 0)
        self._local = torch.empty((rows, *shape[1:]))

    def dim(self):
        return len(self.shape)

    def to_local(self):
        return self._local


@pytest.mark.parametrize("shape", [(10, 3), (7, 2, 5), (3, 4), (1, 8), (9,)], ids=str)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_row_ranges_follow_torch_chunk(shape, world):
    from leantune.optim.segments import LocalSegment, Segment, rank_row_ranges, row_range

    per_dim0 = math.prod(shape[1:-1]) if len(shape) >= 2 else 1
    sizes = [c.shape[0] for c in torch.chunk(torch.empty(shape), world)]
    sizes += [0] * (world - len(sizes))
    bounds = [sum(sizes[:r]) * per_dim0 for r in range(world + 1)]
    want = [(bounds[r], bounds[r + 1]) for r in range(world)]
    rows = math.prod(shape) // (shape[-1] if len(shape) >= 2 else 1)
    seg = Segment("s", rows=(range(0, rows, 2),))
    for rank in range(world):
        param = _Sharded(shape, rank, world)
        assert rank_row_ranges(param) == want
        assert row_range(param) == want[rank]
        local = LocalSegment(seg, param)
        lo, hi = want[rank]
        assert _flat(local.rows) == [i - lo for i in range(0, rows, 2) if lo <= i < hi]
        assert local.n_rows == len(_flat(local.rows))
        assert local.rank_rows == [len([i for i in range(0, rows, 2) if a <= i < b]) for a, b in want]


def test_rank_row_ranges_refuse_other_layouts():
    from torch.distributed.tensor import Replicate, Shard

    from leantune.optim.segments import rank_row_ranges

    with pytest.raises(
        ValueError, match=r"need a 1-D mesh and Shard\(0\), got \(Replicate\(\),\) on a 1-D mesh"
    ):
        rank_row_ranges(_Sharded((4, 2), 0, 2, placements=(Replicate(),)))
    with pytest.raises(ValueError, match=r"got \(Shard\(dim=1\),\)"):
        rank_row_ranges(_Sharded((4, 2), 0, 2, placements=(Shard(1),)))
    two_d = _Sharded((4, 2), 0, 2)
    two_d.device_mesh.ndim = 2
    with pytest.raises(ValueError, match="on a 2-D mesh"):
        rank_row_ranges(two_d)
    with pytest.raises(ValueError, match=r"^unexpected shard of \(4, 2\): local \(3, 2\)$"):
        rank_row_ranges(_Sharded((4, 2), 0, 2, local_rows=3))


def test_local_segment_of_a_plain_tensor_is_the_whole_segment():
    from leantune.optim.segments import LocalSegment, Segment

    p = torch.zeros(6, 4)
    whole_rows = LocalSegment(Segment("s", rows=(range(2, 5),)), p)
    assert whole_rows.in_place and whole_rows.rows == (range(2, 5),) and whole_rows.rank_rows == [3]
    assert whole_rows.global_shape == torch.Size([3, 4]) and not whole_rows.vector
    strided = LocalSegment(Segment("s", rows=(range(0, 6, 2),)), p)
    assert not strided.in_place and strided.n_rows == 3
    cols = LocalSegment(Segment("s", cols=(range(1, 3),)), p)
    assert not cols.in_place and cols.rows == (range(0, 6),) and cols.n_rows == 6
    vec = LocalSegment(Segment("s", rows=(range(1, 4),)), torch.zeros(5))
    assert vec.vector and vec.in_place and vec.global_shape == torch.Size([3])
