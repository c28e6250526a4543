"""Tensor parallelism (leantune.distributed.tensor_parallel + MeshCollectives) on ranks in one
process (threads, tests/threaded.py): a tp=2 run of each fused optimizer against one process on
the same batches, the statistics against their definitions, the norm weights, the refusals.

The same through `leantune train dist.tp=2` across processes is in
tests/distributed/test_tensor_parallel_cli.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from leantune.distributed.collectives import MeshCollectives, detect_collectives
from leantune.distributed.tensor_parallel import TensorParallelError, apply_tensor_parallel, tp_plan
from leantune.optim import LOMO, AdaLomo, InBackward
from tests.distributed.user_loop_common import STEPS, global_batch, tiny_model
from tests.threaded import run_ranks

OPTIMIZERS = {
    "adalomo": lambda m: AdaLomo(m, lr=0.05, weight_decay=0.1),
    "lomo-clip": lambda m: LOMO(m, lr=0.05, clip_grad_norm=0.5),
    "adamw-in-backward": lambda m: InBackward(
        torch.optim.AdamW, m, lr=1e-2, weight_decay=0.1, clip_grad_norm=0.5
    ),
    "adalomo-accumulate": lambda m: AdaLomo(m, lr=0.05, accumulation_steps=2, clip_grad_norm=0.3),
}


def _train(model, opt, *, accumulate: int = 1) -> list[float]:
    norms = []
    for step in range(STEPS):
        ids, labels = global_batch(step)
        for part in range(accumulate):
            rows = slice(part * len(ids) // accumulate, (part + 1) * len(ids) // accumulate)
            result = opt.backward(model(input_ids=ids[rows], labels=labels[rows]).loss)
        norms.append(result.grad_norm)
    return norms


def _models(n: int) -> list:
    # built here, not in the rank threads: they share torch's global generator, which tiny_model() seeds
    return [tiny_model() for _ in range(n)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[dict[str, torch.Tensor], list[float]]]:
    out = {}
    for name, make in OPTIMIZERS.items():
        model = tiny_model()
        norms = _train(model, make(model), accumulate=2 if "accumulate" in name else 1)
        out[name] = ({k: v.detach().clone() for k, v in model.named_parameters()}, norms)
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tp2_equals_one_process(name, reference):
    models = _models(2)

    def rank_fn(rank):
        model = models[rank]
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        report = apply_tensor_parallel(model, mesh)
        opt = OPTIMIZERS[name](model)
        assert isinstance(opt.collectives, MeshCollectives)  # found by itself
        norms = _train(model, opt, accumulate=2 if "accumulate" in name else 1)
        return report, {k: _full(v).detach().clone() for k, v in model.named_parameters()}, norms

    results = run_ranks(2, rank_fn)
    weights, norms = reference[name]
    report = results[0][0]
    assert len(report.colwise) == 2 * 5 and len(report.rowwise) == 2 * 2
    assert "lm_head" in report.whole and "model.embed_tokens" in report.whole
    # Adam's first step is lr * g / (|g| + eps): an element whose gradient is ~eps (1e-8) moves by
    # lr * |dg| / eps, so the split matmuls' other summation order (|dg| ~ 1e-9 there) shows as
    # ~1e-5 on one or two elements after step 1 (measured: 1.09e-5, unchanged after 4 steps)
    atol = 5e-5 if name.startswith("adamw") else 1e-6
    for _, got, got_norms in results:
        for key, want in weights.items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
        if norms[0] is not None:  # the norm counts a replicated tensor once, a shard once per piece
            assert got_norms == pytest.approx(norms, rel=1e-5)
    if name == "lomo-clip":
        assert min(norms) > 0.5  # the threshold binds: the clipping is under test
    # the run moved away from the initial weights (so equality is not trivial)
    start = dict(tiny_model().named_parameters())
    assert all(not torch.equal(start[k], weights[k]) for k in weights)


def test_tp2_by_two_data_parallel_equals_one_process(reference):
    """tp=2 x dp=2 on 4 ranks: each dp rank takes half of every global batch; gradients are
    averaged over the dp group in the hooks."""
    models = _models(4)

    def rank_fn(rank):
        model = models[rank]
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"])
        dp_rank = mesh.get_local_rank("dp")
        opt = LOMO(
            model, lr=0.05, clip_grad_norm=0.5, collectives=MeshCollectives(dp_group=mesh["dp"].get_group())
        )
        norms = []
        for step in range(STEPS):
            ids, labels = global_batch(step)
            half = slice(dp_rank * 2, dp_rank * 2 + 2)
            norms.append(opt.backward(model(input_ids=ids[half], labels=labels[half]).loss).grad_norm)
        return {k: _full(v).detach().clone() for k, v in model.named_parameters()}, norms

    weights, norms = reference["lomo-clip"]
    for got, got_norms in run_ranks(4, rank_fn):
        assert got_norms == pytest.approx(norms, rel=1e-5)
        for key, want in weights.items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


def test_tp2_by_fsdp2_equals_one_process(reference):
    """FSDP2 over the dp dimension of the same mesh: colwise weights become
    (_StridedShard(0), Shard(0)), rowwise ones (Shard(0), Shard(1)), the rest Shard(0) over dp."""
    models = _models(4)

    def rank_fn(rank):
        from leantune.distributed.strategy import apply_fsdp

        model = models[rank]
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"])
        apply_fsdp(model, mesh=mesh["dp"])
        opt = OPTIMIZERS["adalomo-accumulate"](model)
        assert isinstance(opt.collectives, MeshCollectives) and not opt.collectives.replicated
        dp_rank = mesh.get_local_rank("dp")
        norms = []
        for step in range(STEPS):
            ids, labels = global_batch(step)
            for part in range(2):  # this rank's half of the batch, in two micro-batches
                rows = slice(dp_rank * 2 + part, dp_rank * 2 + part + 1)
                result = opt.backward(model(input_ids=ids[rows], labels=labels[rows]).loss)
            norms.append(result.grad_norm)
        q = model.model.layers[0].self_attn.q_proj.weight
        state = opt.state_dict()["state"]
        rows = next(st["row"] for st in state.values() if "row" in st and st["row"].shape == (q.shape[0],))
        return (
            tuple(type(pl).__name__ for pl in q.placements),
            tuple(type(pl).__name__ for pl in rows.placements),
            {k: _full(v).detach().clone() for k, v in model.named_parameters()}, norms,
        )  # fmt: skip

    weights, norms = reference["adalomo-accumulate"]
    for q_layout, row_layout, got, got_norms in run_ranks(4, rank_fn):
        assert q_layout == ("_StridedShard", "Shard") and row_layout == q_layout  # rows keep the stride
        assert got_norms == pytest.approx(norms, rel=1e-5)
        for key, want in weights.items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_statistics_are_summed_over_the_dimensions_that_split_their_axis():
    """Row statistics over column shards, column statistics over row shards, RMS over both,
    nothing over a replicating dimension; the norm weight of a replicated tensor is 1/copies."""

    def rank_fn(rank):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
        full = torch.arange(16.0).view(4, 4)
        p = distribute_tensor(full, mesh, [Shard(0), Shard(1)])  # rows over a, columns over b
        r = distribute_tensor(full, mesh, [Replicate(), Shard(1)])  # columns over b only
        c = MeshCollectives()
        local = p.to_local()
        rows = c.shard_sum_over(p, local.sum(1), "cols")  # row sums of my rows
        cols = c.shard_sum_over(p, local.sum(0), "rows")
        total = c.shard_sum_over(p, local.sum(), "all")
        r_rows = c.shard_sum_over(r, r.to_local().sum(1), "cols")
        r_cols = c.shard_sum_over(r, r.to_local().sum(0).clone(), "rows")  # nothing to sum
        plain = c.shard_sum_over(full, torch.tensor(5.0), "all")
        return (
            mesh.get_coordinate(), rows, cols, total.item(), r_rows, r_cols,
            c.norm_share(p), c.norm_share(r), c.norm_share(full), plain.item(),
        )  # fmt: skip

    full = torch.arange(16.0).view(4, 4)
    for coord, rows, cols, total, r_rows, r_cols, sp, sr, sf, plain in run_ranks(4, rank_fn):
        a, b = coord
        torch.testing.assert_close(rows, full.sum(1)[2 * a : 2 * a + 2])
        torch.testing.assert_close(cols, full.sum(0)[2 * b : 2 * b + 2])
        assert total == full.sum().item()
        torch.testing.assert_close(r_rows, full.sum(1))
        torch.testing.assert_close(r_cols, full[:, 2 * b : 2 * b + 2].sum(0))
        assert (sp, sr, sf, plain) == (1.0, 0.5, 0.25, 5.0)


def test_optimizer_state_is_exported_with_the_layout_of_its_axis():
    models = _models(2)

    def rank_fn(rank):
        model = models[rank]
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        apply_tensor_parallel(model, mesh)
        opt = AdaLomo(model, lr=0.05)
        _train(model, opt)
        sd = opt.state_dict()["state"]
        names = [n for n, _ in model.named_parameters()]
        by_name = {names[i]: st for i, st in sd.items()}
        q, o = (
            by_name["model.layers.0.self_attn.q_proj.weight"],
            by_name["model.layers.0.self_attn.o_proj.weight"],
        )
        norm = by_name["model.norm.weight"]
        return (
            tuple(q["row"].placements), tuple(q["col"].placements), q["row"].shape, q["col"].shape,
            tuple(o["row"].placements), tuple(o["col"].placements),
            isinstance(norm["v"], DTensor), q["row"].full_tensor(),
        )  # fmt: skip

    got = run_ranks(2, rank_fn)
    q_row, q_col, row_shape, col_shape, o_row, o_col, norm_is_dtensor, _ = got[0]
    assert (q_row, q_col, o_row, o_col) == ((Shard(0),), (Replicate(),), (Replicate(),), (Shard(0),))
    assert (tuple(row_shape), tuple(col_shape)) == ((32,), (32,)) and not norm_is_dtensor
    torch.testing.assert_close(got[0][-1], got[1][-1])  # gathered: one global row statistic


def test_a_model_without_a_plan_is_refused_by_name():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(TensorParallelError, match=r"GPT2LMHeadModel \(gpt2\) has no tensor-parallel plan"):
        tp_plan(gpt2)
    assert tp_plan(tiny_model())["model.layers.*.self_attn.o_proj"] == "rowwise"


def test_sizes_that_do_not_divide_and_unsupported_styles_are_refused():
    models = _models(3)

    def rank_fn(rank):
        mesh = init_device_mesh("cpu", (3,), mesh_dim_names=("tp",))
        with pytest.raises(TensorParallelError, match=r"dist.tp=3 must divide num_attention_heads = 4"):
            apply_tensor_parallel(models[rank], mesh)
        return True

    assert all(run_ranks(3, rank_fn))

    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    moe = Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, num_experts=4, num_experts_per_tok=2,
        )
    )  # fmt: skip

    def moe_fn(rank):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        with pytest.raises(TensorParallelError, match=r"packed_colwise .*MoE experts"):
            apply_tensor_parallel(moe, mesh)
        return True

    assert all(run_ranks(2, moe_fn))


def test_a_partial_mesh_without_a_data_parallel_group_is_refused():
    models = _models(4)

    def rank_fn(rank):
        model = models[rank]
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"])
        with pytest.raises(ValueError) as err:
            detect_collectives(model.parameters())
        return dist.get_rank(), str(err.value)

    message = (
        "the tensor-parallel parameters lie on a mesh of 2 of the job's 4 ranks, so the optimizer "
        "cannot tell how the other ranks relate to them: pass "
        "collectives=leantune.distributed.collectives.MeshCollectives(dp_group=...) with the "
        "data-parallel group over which gradients are averaged"
    )
    assert run_ranks(4, rank_fn) == [(rank, message) for rank in range(4)]


def test_bf16_stochastic_rounding_keeps_replicated_tensors_identical_across_the_group():
    """The noise streams stay in step: embeddings, norms and the head (replicated) round alike on
    both ranks, so they stay bitwise equal; the run tracks the one-process bf16 run."""
    models = [tiny_model().to(torch.bfloat16) for _ in range(3)]

    def rank_fn(rank):
        model = models[rank]
        apply_tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
        _train(model, AdaLomo(model, lr=0.05, rounding="stochastic", seed=3))
        return {k: _full(v).detach().clone() for k, v in model.named_parameters()}

    ranks = run_ranks(2, rank_fn)
    reference = models[2]
    _train(reference, AdaLomo(reference, lr=0.05, rounding="stochastic", seed=3))
    start = dict(tiny_model().to(torch.bfloat16).named_parameters())
    for key, want in reference.named_parameters():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # no replica drifts
        moved = (want.float() - start[key].float()).abs().mean()
        assert (ranks[0][key].float() - want.float()).abs().mean() < 0.25 * moved, key
