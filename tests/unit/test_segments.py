"""Optimizer segments: a part of a tensor updated as a tensor of its own. Oracle: the same parts as
separate parameters, with the same gradients (the loss is a sum of one term per part)."""

from __future__ import annotations

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
