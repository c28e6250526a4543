"""leantune.distributed.collectives on a process group that is not the whole job (a dimension of a
2-D mesh, as HSDP's shard group or tensor parallelism beside data parallelism make), segment state
gathered and sliced again, 3-D parameters, and the refusals whole.

Ranks are threads (tests/threaded.py). Every reduction is compared with its definition computed
in the test from the ranks' inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from leantune.distributed.collectives import (
    MeshCollectives,
    ReplicatedCollectives,
    ShardedCollectives,
    _shard_axis,
    detect_collectives,
)
from leantune.optim.segments import LocalSegment, Segment
from tests.threaded import run_ranks


def _mesh():
    """4 ranks as a 2 x 2 mesh: ``a`` groups ranks {0, 2} and {1, 3}, ``b`` groups {0, 1} and {2, 3}."""
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))


def test_replicated_and_sharded_collectives_reduce_over_their_group_only():
    def rank_fn(rank):
        group = _mesh()["b"].get_group()
        rep = ReplicatedCollectives(group)
        avg = rep.average_gradient(torch.tensor([float(rank)]))
        sh = ShardedCollectives(group)
        norms = sh.sum_square_norms(torch.tensor(float(rank + 1)))
        partial = sh.shard_sum(None, torch.tensor([10.0 * rank]))
        return (rep.group is group, rep.world_size, avg.item(), sh.rank, sh.seed_offset(), norms.item(),
                partial.item())  # fmt: skip

    got = run_ranks(4, rank_fn)
    # group {0, 1}: mean 0.5, norms 1 + 2, partials 0 + 10; group {2, 3}: 2.5, 3 + 4, 20 + 30
    assert got == [
        (True, 2, 0.5, 0, 0, 3.0, 10.0),
        (True, 2, 0.5, 1, 1_000_003, 3.0, 10.0),
        (True, 2, 2.5, 0, 0, 7.0, 50.0),
        (True, 2, 2.5, 1, 1_000_003, 7.0, 50.0),
    ]


def _sharded_param(mesh, full: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))


def test_segment_state_is_gathered_over_the_group_and_sliced_again_on_load():
    """q-like (8, 4) weight on 2 shards, a segment of rows 0..4: rank 0 holds 4 of its rows, rank
    1 one. Its state (a row statistic, a column statistic, a 2-D moment) is saved whole and each
    rank takes its own rows back, also from a plain tensor (a one-process checkpoint)."""
    full_row = torch.arange(5.0)
    full_moment = torch.arange(20.0).reshape(5, 4)

    def rank_fn(rank):
        mesh = _mesh()["b"]
        param = _sharded_param(mesh, torch.zeros(8, 4))
        seg = LocalSegment(Segment("a", rows=(range(0, 5),)), param)
        c = ShardedCollectives(mesh.get_group())
        mine = slice(0, 4) if c.rank == 0 else slice(4, 5)
        row = c.export_state(param, "a|row", full_row[mine].clone(), seg)
        moment = c.export_state(param, "a|exp_avg", full_moment[mine].clone(), seg)
        col = c.export_state(param, "a|col", torch.ones(4), seg)
        loaded = [
            c.import_state(param, key, value, seg)
            for key, value in (("a|row", row), ("a|exp_avg", moment), ("a|col", col), ("a|row", full_row))
        ]
        layouts = [(type(v), tuple(v.placements)) for v in (row, moment, col)]
        return seg.rank_rows, layouts, [v.full_tensor() for v in (row, moment, col)], loaded, mine

    for rank_rows, layouts, (row, moment, col), loaded, mine in run_ranks(4, rank_fn):
        assert rank_rows == [4, 1]
        assert layouts == [(DTensor, (Replicate(),))] * 3
        assert torch.equal(row, full_row) and torch.equal(moment, full_moment)
        assert torch.equal(col, torch.ones(4))
        assert torch.equal(loaded[0], full_row[mine]) and torch.equal(loaded[1], full_moment[mine])
        assert torch.equal(loaded[2], torch.ones(4))  # a column statistic is the same on every rank
        assert torch.equal(loaded[3], full_row[mine])


def test_the_row_statistic_of_a_3d_parameter_has_one_entry_per_flattened_row():
    # an expert stack (E=4, R=3, C=2) on 2 shards: 4 * 3 rows of the (rows, cols) view, 6 per rank
    def rank_fn(rank):
        mesh = init_device_mesh("cpu", (2,))
        param = _sharded_param(mesh, torch.zeros(4, 3, 2))
        out = ShardedCollectives().export_state(param, "row", torch.full((6,), float(rank)))
        return tuple(out.shape), out.stride(), tuple(out.placements), out.full_tensor()

    for shape, stride, placements, full in run_ranks(2, rank_fn):
        assert shape == (12,) and stride == (1,) and placements == (Shard(0),)
        assert torch.equal(full, torch.tensor([0.0] * 6 + [1.0] * 6))


def test_detect_collectives_looks_past_frozen_parameters_and_names_the_problem():
    def rank_fn(rank):
        mesh = _mesh()
        frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
        on_b = _sharded_param(mesh["b"], torch.zeros(4, 2))
        on_a = _sharded_param(mesh["a"], torch.zeros(4, 2))
        found = detect_collectives([frozen, on_b])  # a frozen tensor first: the shard still counts
        errors = []
        for params in ([on_b, torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))],
                       [on_b, on_a]):  # fmt: skip
            with pytest.raises(ValueError) as err:
                detect_collectives(params)
            errors.append(str(err.value))
        return type(found), found.group is mesh["b"].get_group(), errors

    for kind, same_group, errors in run_ranks(4, rank_fn):
        assert kind is ShardedCollectives and same_group
        assert errors == [
            "2 trainable parameters are plain tensors next to 1 FSDP2 shards",
            "the shards lie on different device meshes",
        ]


def test_mesh_collectives_norm_group_stages_and_shares():
    """4 ranks as 2 pipeline stages of 2: a tensor sharded over 2 ranks is held once per stage, a
    plain tensor by the 2 ranks of its stage (each counts half)."""

    def rank_fn(rank):
        mesh = _mesh()
        param = _sharded_param(mesh["b"], torch.zeros(4, 2))
        plain = torch.zeros(3)
        staged = MeshCollectives(stages=2)
        sub = MeshCollectives(norm_group=mesh["b"].get_group())
        total = sub.sum_square_norms(torch.tensor(float(rank + 1)))
        return (
            staged.spans_pipeline,
            MeshCollectives().spans_pipeline,
            staged.norm_share(param),
            staged.norm_share(plain),
            sub.norm_group is mesh["b"].get_group(),
            sub.norm_size,
            total.item(),
        )

    got = run_ranks(4, rank_fn)
    assert [g[:4] for g in got] == [(True, False, 1.0, 0.5)] * 4
    assert [g[4:] for g in got] == [(True, 2, 3.0)] * 2 + [(True, 2, 7.0)] * 2


@pytest.mark.parametrize("stages", [0, 3, -1, True, 2.0])
def test_mesh_collectives_refuse_stages_that_do_not_divide_the_norm_group(stages):
    def rank_fn(rank):
        with pytest.raises(ValueError) as err:
            MeshCollectives(stages=stages)
        return str(err.value)

    message = (
        "stages must be a positive number of pipeline stages that divides the norm group's 2 ranks, "
        f"got {stages!r}"
    )
    assert run_ranks(2, rank_fn) == [message] * 2


def test_shard_axis_of_each_placement():
    # the (rows, cols) view: the last dimension is the columns, every other one folds into rows
    assert _shard_axis(Shard(1), 2) == "cols"
    assert _shard_axis(Shard(-1), 2) == "cols"
    assert _shard_axis(Shard(2), 3) == "cols"
    assert _shard_axis(Shard(1), 3) == "rows"
    assert _shard_axis(Shard(0), 2) == "rows"
    assert _shard_axis(Shard(0), 1) == "rows"  # a vector has rows only
    assert _shard_axis(Replicate(), 2) is None


def test_mesh_collectives_export_each_state_with_its_axis_layout_and_refuse_the_rest():
    """A (4, 6) weight split by columns over 2 ranks (RowwiseParallel's Shard(1)): a moment keeps
    the weight's layout, a row statistic (one per row, summed over the column shards) is
    replicated, a column statistic is split like the columns; anything else is refused."""

    def rank_fn(rank):
        mesh = init_device_mesh("cpu", (2,))
        param = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)]))
        c = MeshCollectives()
        moment = c.export_state(param, "exp_avg", torch.full((4, 3), float(rank)))
        row = c.export_state(param, "row", torch.arange(4.0))
        col = c.export_state(param, "col", torch.full((3,), float(rank)))
        layouts = [(tuple(t.placements), tuple(t.shape), t.stride()) for t in (moment, row, col)]
        errors = []
        for args in ((param, "foo", torch.zeros(2)), (param, "a|row", torch.zeros(4), object())):
            with pytest.raises(ValueError) as err:
                c.export_state(*args)
            errors.append(str(err.value))
        return layouts, [t.full_tensor() for t in (moment, row, col)], errors

    for layouts, (moment, row, col), errors in run_ranks(2, rank_fn):
        assert layouts == [
            ((Shard(1),), (4, 6), (6, 1)),
            ((Replicate(),), (4,), (1,)),
            ((Shard(0),), (6,), (1,)),
        ]
        assert torch.equal(moment, torch.tensor([[0.0] * 3 + [1.0] * 3] * 4))
        assert torch.equal(row, torch.arange(4.0))
        assert torch.equal(col, torch.tensor([0.0] * 3 + [1.0] * 3))
        assert errors == [
            "optimizer state 'foo' of shape (2,) has no tensor-parallel layout "
            "(parameter (4, 6), local (4, 3))",
            "segments (half fine-tuning) are not supported on tensor-parallel parameters",
        ]


def test_mesh_collectives_shard_sum_adds_over_every_dimension_that_splits_the_tensor():
    # 4 ranks as 2 x 2: a tensor split by rows over ``a`` and by columns over ``b`` is summed over
    # both; one replicated over ``a`` and split over ``b`` only over ``b``; a plain tensor not at all
    def rank_fn(rank):
        mesh = _mesh()
        both = distribute_tensor(torch.zeros(4, 4), mesh, [Shard(0), Shard(1)])
        half = distribute_tensor(torch.zeros(4, 4), mesh, [Replicate(), Shard(1)])
        c = MeshCollectives()
        return [c.shard_sum(p, torch.tensor([float(rank + 1)])).item() for p in (both, half, torch.zeros(2))]

    # ranks 0..3 at mesh positions (0,0), (0,1), (1,0), (1,1); ``b`` groups {0,1} and {2,3}
    assert run_ranks(4, rank_fn) == [[10.0, 3.0, 1.0], [10.0, 3.0, 2.0], [10.0, 7.0, 3.0], [10.0, 7.0, 4.0]]
