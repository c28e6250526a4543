"""leantune.estimate under tensor and pipeline parallelism (``tp``, ``pp``): the per-device terms
against real split models (a DTensor tp=2 model on threaded ranks, the stage modules of
leantune.distributed.pipeline), the communication volumes against their closed forms, the
layout errors (and the CLI's exit 2 for them)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from leantune.cli import main
from leantune.estimate import (
    ModelShape,
    TrainSetup,
    _activations,
    _estimate_part,
    _stage_layer_counts,
    activation_bytes_per_token,
    communication_per_step,
    estimate_memory,
)
from leantune.estimate import _parts as parts_of

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=5,
              num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def _llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG, **extra))


def _shapes(**extra) -> dict[str, ModelShape]:
    """The same model read both ways: by the LLaMA formulas and counted on transformers' code."""
    from transformers import LlamaConfig

    fields = {**CONFIG, **extra}
    return {
        "formulas": ModelShape.from_hf_config(fields),
        "family": ModelShape.from_hf_config(LlamaConfig(**fields).to_dict()),
    }


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


# ------------------------------------------------------------------------------ tensor parallel
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "biases"])
@pytest.mark.parametrize("how", ["formulas", "family"])
def test_tp2_weights_and_adalomo_state_equal_a_real_tp_split_model(how, bias):
    """Each rank of a model split by apply_tensor_parallel holds exactly the estimate's weights, and
    AdaLomo's state after one step (statistics of the local shards + its workspace) is its state."""
    from torch.distributed.device_mesh import init_device_mesh

    from leantune.distributed.tensor_parallel import apply_tensor_parallel
    from leantune.optim import AdaLomo
    from tests.threaded import run_ranks

    extra = dict(attention_bias=bias, mlp_bias=bias)
    models = [_llama(**extra) for _ in range(2)]  # here, not in the threads: torch's global RNG

    def rank_fn(rank):
        model = models[rank]
        apply_tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
        weights = sum(_local_bytes(p) for p in model.parameters())
        opt = AdaLomo(model, lr=1e-3)
        ids = torch.arange(16).remainder(CONFIG["vocab_size"]).unsqueeze(0)
        opt.backward(model(input_ids=ids, labels=ids).loss)
        stats = sum(t.numel() * 4 for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        return weights, stats + sum(b.numel() * 4 for b in opt._buffers.values())

    results = run_ranks(2, rank_fn)
    assert results[0] == results[1]
    b = estimate_memory(
        _shapes(**extra)[how], TrainSetup(optimizer="adalomo", dtype="fp32", tp=2, world_size=2)
    )
    assert (b.weights, b.optimizer_state) == results[0]
    whole = estimate_memory(_shapes(**extra)[how], TrainSetup(optimizer="adalomo", dtype="fp32"))
    assert b.weights < whole.weights


def test_tp_splits_attention_and_mlp_activations_and_keeps_the_residual_stream():
    shape = _shapes()["formulas"]
    for dtype in ("fp32", "bf16", "mixed"):
        one, two = (activation_bytes_per_token(shape, dtype, tp=tp) for tp in (1, 2))
        s = 4 if dtype == "fp32" else 2
        q, kv, i = shape.q_dim, shape.kv_dim, shape.intermediate_size
        split = s * (2 * q + 2 * kv) + 4 * shape.num_heads + 4 * s * i  # attention + MLP
        assert one["layer"] - two["layer"] == split // 2
        assert two["layer_input"] == one["layer_input"] and two["tail"] == one["tail"]
    padded = [activation_bytes_per_token(shape, "bf16", padded_len=64, tp=tp) for tp in (1, 2)]
    # k/v repeated to all heads (2 s (q - kv)) split too; the L x L mask is whole on every rank
    assert padded[0]["layer"] - padded[1]["layer"] == (2 * (2 * 64 + 2 * 32) + 16 + 8 * 160 + 4 * 32) // 2
    # the family's own count loses what the formulas say tp removes
    setup = dict(optimizer="floor", dtype="bf16", seq_len=32)
    for shape in _shapes().values():
        one, two = (estimate_memory(shape, TrainSetup(**setup, tp=tp, world_size=tp)) for tp in (1, 2))
        per_layer = 32 * (activation_bytes_per_token(shape, "bf16")["layer"] -
                          activation_bytes_per_token(shape, "bf16", tp=2)["layer"])  # fmt: skip
        assert one.activations - two.activations == pytest.approx(shape.num_layers * per_layer, abs=1)


# ---------------------------------------------------------------------------- pipeline parallel
@pytest.mark.parametrize("pp", [2, 3, 5])
def test_stage_weights_equal_the_pipeline_stage_modules(pp):
    from leantune.distributed.pipeline import split_causal_lm, stage_layer_counts

    model = _llama()
    assert _stage_layer_counts(5, pp) == stage_layer_counts(5, pp)
    for how, shape in _shapes().items():
        setup = TrainSetup(optimizer="adalomo", dtype="fp32", pp=pp, world_size=pp, accumulation_steps=4)
        parts = parts_of(shape, setup)
        for i, part in enumerate(parts):
            stage = split_causal_lm(model, pp, i)
            assert part.parameters * 4 == sum(_local_bytes(p) for p in stage.parameters()), (how, i)
        b = estimate_memory(shape, setup)
        assert len(b.stage_totals) == pp and b.total == max(b.stage_totals) == b.stage_totals[b.stage]
        # the heaviest stage's weights, its fp32 accumulation buffers (4 micro-batches)
        assert b.weights == parts[b.stage].parameters * 4
        assert b.gradients >= 4 * parts[b.stage].parameters


def test_micro_batches_in_flight_1f1b_and_gpipe():
    shape = _shapes()["formulas"]

    def in_flight(schedule, n, pp=3):
        st = TrainSetup(pp=pp, world_size=pp, accumulation_steps=n, schedule=schedule)
        return [p.in_flight for p in parts_of(shape, st)]

    assert in_flight("1f1b", 8) == [3, 2, 1] and in_flight("1f1b", 2) == [2, 2, 1]
    assert in_flight("gpipe", 8) == [8, 8, 8]
    assert [p.in_flight for p in parts_of(shape, TrainSetup(tp=2, world_size=2, accumulation_steps=8))] == [1]
    # with checkpointing, stage 0 keeps its layers' inputs per micro-batch in flight + the buffers
    # of the pipeline: n received gradients and the outputs of the micro-batches in flight
    common = dict(optimizer="lomo", dtype="bf16", seq_len=64, grad_checkpointing=True, device="cuda")
    act = 64 * shape.hidden_size * 2

    def stage0(schedule):
        st = TrainSetup(**common, pp=2, world_size=2, accumulation_steps=8, schedule=schedule)
        part = parts_of(shape, st)[0]
        return _estimate_part(shape, st, part, _activations(shape, st)), part

    (b1, p1), (bg, pg) = stage0("1f1b"), stage0("gpipe")
    assert (p1.in_flight, pg.in_flight) == (2, 8) and b1.moment == bg.moment
    rope = 2 * 64 * shape.head_dim * 2
    # per micro-batch in flight: its 3 layer inputs, RoPE's cos/sin, the stage output
    assert bg.activations - b1.activations == (8 - 2) * (len(p1.layers) * act + rope + act)


# ------------------------------------------------------------------------------- communication
def test_communication_volumes_equal_their_closed_forms():
    shape = _shapes()["formulas"]
    h, tokens, n = shape.hidden_size, 2 * 32, 4
    base = dict(optimizer="adalomo", dtype="bf16", seq_len=32, batch_size=2, accumulation_steps=n)
    params = shape.parameters

    # tp 2 (no checkpointing): 4 all-reduces of tokens x h bf16 per layer and micro-batch, ring 2(N-1)/N
    c = communication_per_step(shape, TrainSetup(**base, tp=2, world_size=2))
    assert c["tp activations"] == int(n * 5 * 4 * tokens * h * 2 * (2 * 1 / 2))
    # AdaLomo: q/k/v/gate/up (split rows): in + 3 floats; o/down (split columns): out + 2
    per_layer = 5 * (h + 3) + 2 * (h + 2)
    assert c["tp statistics"] == int(4 * 5 * per_layer * 1.0)
    ck = communication_per_step(shape, TrainSetup(**base, tp=2, world_size=2, grad_checkpointing=True))
    assert ck["tp activations"] == n * 5 * (2 * 2 * 2 + 2 * 2) * tokens * h  # + the recomputed forward
    mixed = communication_per_step(shape, TrainSetup(**{**base, "dtype": "mixed"}, tp=2, world_size=2))
    assert mixed["tp activations"] == int(n * 5 * (2 * 2 + 2 * 4) * tokens * h)  # fp32 input gradients

    # pp 3: a middle stage sends its output forward and its input gradient backward per micro-batch
    setup = TrainSetup(**base, pp=3, world_size=3)
    assert [communication_per_step(shape, setup, i)["pp activations"] for i in range(3)] == [
        n * tokens * h * 2, 2 * n * tokens * h * 2, n * tokens * h * 2,
    ]  # fmt: skip
    assert communication_per_step(shape, setup) == {"pp activations": 2 * n * tokens * h * 2}

    # dp 4, ddp: the fused hooks all-reduce an fp32 copy of each gradient once per step; torch DDP
    # all-reduces the bf16 gradients per micro-batch
    ddp = communication_per_step(shape, TrainSetup(**base, world_size=4, strategy="ddp"))
    assert ddp == {"ddp gradients": int(4 * params * 2 * 3 / 4)}
    adamw = communication_per_step(
        shape, TrainSetup(**{**base, "optimizer": "adamw"}, world_size=4, strategy="ddp")
    )
    assert adamw == {"ddp gradients": int(n * 2 * params * 2 * 3 / 4)}
    # fsdp: all-gather forward + backward, reduce-scatter, per micro-batch; AdaLomo's shard sums
    fsdp = communication_per_step(shape, TrainSetup(**base, world_size=4, strategy="fsdp"))
    floats = sum(s[-1] + 3 if len(s) == 2 else 2 for _, s in shape.tensors())
    assert fsdp == {
        "fsdp weights/grads": int(3 * n * params * 2 * 3 / 4),
        "fsdp statistics": int(4 * floats * 2 * 3 / 4),
    }
    # 3D: tp 2 x pp 2 x dp 2 (ddp): each kind on the local (stage, tp-split) parameters
    three = TrainSetup(**base, tp=2, pp=2, world_size=8, strategy="ddp")
    stage0 = parts_of(shape, three)[0]
    c0 = communication_per_step(shape, three, 0)
    assert set(c0) == {"tp activations", "tp statistics", "pp activations", "ddp gradients"}
    assert c0["tp activations"] == int(n * 3 * 4 * tokens * h * 2)  # 3 of the 5 layers on stage 0
    assert c0["ddp gradients"] == int(4 * stage0.parameters * 2 * 1 / 2)
    assert communication_per_step(shape, TrainSetup(**base)) == {}
    assert estimate_memory(shape, TrainSetup(**base)).communication == {}
    assert estimate_memory(shape, three).communication == communication_per_step(shape, three)


def test_one_device_layout_is_the_old_estimate():
    shape = _shapes()["formulas"]
    for setup in (dict(optimizer="adamw", dtype="mixed"), dict(optimizer="adalomo", grad_checkpointing=True)):
        plain = estimate_memory(shape, TrainSetup(**setup))
        explicit = estimate_memory(shape, TrainSetup(**setup, tp=1, pp=1, schedule="gpipe"))
        assert replace(explicit, setup=plain.setup) == plain
        assert plain.stage_totals == [] and "layout" not in plain.notes


def test_the_table_and_json_show_the_layout_stages_and_communication(capsys):
    argv = ["estimate", "--model", "7b", "--seq", "4096", "--grad-checkpointing", "--device", "cuda",
            "--world-size", "8", "--tp", "2", "--pp", "2", "--accumulation-steps", "4"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tp 2 x pp 2 x dp 2 (ddp) = 8 devices, 1f1b over 4 micro-batches" in out
    assert re.search(r"total \(peak\) .* on stage [01] of 2", out) and "stages (GiB)" in out
    for kind in ("tp activations", "tp statistics", "pp activations", "ddp gradients", "total sent"):
        assert kind in out
    # tp x pp x ddp is what `leantune train dist.tp dist.pp dist.strategy=ddp` runs
    assert (
        "leantune train runs it (dist.pp" in out
        and "standard loss (full fp32 logits) on the last stage" in out
    )
    assert main([*argv, "--strategy", "fsdp"]) == 0
    assert "on paper" in capsys.readouterr().out  # pp with fsdp: estimated, not run
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["setup"] | {"tp": 2, "pp": 2, "schedule": "1f1b"} == data["setup"]
    assert len(data["stage_totals"]) == 2 and data["total"] == max(data["stage_totals"])
    assert set(data["communication"]) == {
        "tp activations",
        "tp statistics",
        "pp activations",
        "ddp gradients",
    }


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("shape_extra", "setup", "pattern"),
    [
        ({}, dict(tp=3, world_size=3), r"tp=3 must divide num_attention_heads = 4"),
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, dict(tp=4, world_size=4),
         r"tp=4 must divide num_key_value_heads = 2"),
        ({"intermediate_size": 162, "num_attention_heads": 8, "num_key_value_heads": 4},
         dict(tp=4, world_size=4), r"tp=4 must divide the output features of gate_proj \(162\)"),
        ({}, dict(pp=6, world_size=6), r"cannot split 5 decoder layers into 6 pipeline stages"),
        ({"tie_word_embeddings": True}, dict(pp=2, world_size=2), r"ties its input and output embeddings"),
    ],
)  # fmt: skip
def test_layouts_the_model_cannot_take(shape_extra, setup, pattern):
    shape = ModelShape.from_hf_config({**CONFIG, **shape_extra})
    with pytest.raises(ValueError, match=pattern):
        estimate_memory(shape, TrainSetup(**setup))


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (dict(tp=4, world_size=6), r"world_size 6 is not divisible by tp x pp = 4 x 1"),
        (dict(tp=2, pp=2, world_size=8, strategy="none"), r"world_size 8 with tp x pp = 4 needs strategy"),
        (dict(tp=0), r"Invalid tp"),
        (dict(pp=2, world_size=2, schedule="zb"), r"Invalid schedule: 'zb'"),
    ],
)
def test_setup_errors(setup, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainSetup(**setup)
    assert TrainSetup(tp=2, pp=2, world_size=4).data_parallel == 1  # no replicas: strategy none is fine


def test_tp_refuses_models_it_does_not_split():
    fused = {"model_type": "phi3", **CONFIG, "num_key_value_heads": 4, "pad_token_id": 0}
    with pytest.raises(ValueError, match=r"q/k/v/o and gate/up/down projections"):
        estimate_memory(ModelShape.from_hf_config(fused), TrainSetup(tp=2, world_size=2))


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--tp", "3", "--world-size", "3"], r"tp=3 must divide num_attention_heads = 32"),
        (["--tp", "4", "--world-size", "6"], r"not divisible by tp x pp = 4 x 1"),
        (["--pp", "33", "--world-size", "33"], r"cannot split 32 decoder layers into 33"),
        (["--tp", "0"], r"--tp: must be >= 1"),
        (["--pp", "2", "--world-size", "2", "--schedule", "zb"], r"--schedule: invalid choice"),
    ],
)
def test_cli_layout_errors_exit_2(capsys, extra, pattern):
    try:
        rc = main(["estimate", "--model", "7b", "--seq", "512", *extra])
    except SystemExit as exit_:
        rc = exit_.code
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err


def test_pp_last_stage_has_the_loss_and_stage0_the_embedding():
    shape = _shapes()["formulas"]
    setup = TrainSetup(optimizer="adalomo", pp=2, world_size=2, seq_len=64)
    first, last = parts_of(shape, setup)
    names = lambda p: {n for n, _ in p.tensors}  # noqa: E731
    assert "embed_tokens" in names(first) and "lm_head" not in names(first)
    assert {"lm_head", "norm"} <= names(last) and "embed_tokens" not in names(last)
    h, v, layer = shape.hidden_size, shape.vocab_size, shape.layer_parameters
    assert (first.layers, last.layers) == ((0, 1, 2), (3, 4))
    assert (first.parameters, last.parameters) == (3 * layer + v * h, 2 * layer + h + v * h)
    run = replace(setup, loss_chunk=0)  # the pipeline's loss: full logits
    stage0, stage1 = (_estimate_part(shape, run, p, _activations(shape, run)) for p in (first, last))
    assert stage0.logits == 0 and stage1.moment == "log-softmax backward"
    assert estimate_memory(shape, setup).stage_totals == [stage0.total, stage1.total]


# ------------------------------------------------------------------ the table, line by line
def _stages_line(totals) -> str:
    return "  stages (GiB)" + " " * 8 + " " * 9 + "  " + ", ".join(f"{t / 2**30:.2f}" for t in totals)


def _comm_lines(sent: dict, where: str) -> list[str]:
    notes = {
        "tp activations": "all-reduces of activations: 2 forward (+2 recomputed), 2 backward per layer",
        "tp statistics": "AdaLomo's row/column sums of split matrices (all-reduces)",
        "pp activations": "point to point: outputs forward, input gradients backward, per micro-batch",
        "ddp gradients": "all-reduce of every gradient",
        "fsdp weights/grads": "all-gather in forward and backward, reduce-scatter, per micro-batch",
        "fsdp statistics": "AdaLomo's sums over the shards (all-reduces)",
    }
    rows = [f"  {k:<20}{v / 2**30:>9.3f}  {notes[k]}" for k, v in sent.items() if v]
    total = f"  {'total sent':<20}{sum(sent.values()) / 2**30:>9.3f}"
    return ["", f"  communication per optimizer step, bytes sent by {where}:", *rows, total]


_SPLIT = "tp 2: attention/MLP matrices and their activations / 2, embeddings, head, norms whole"
_PP_RUNS = "leantune train runs it (dist.pp; every rank also holds all the weights, not counted here)"
_PP = "pp 2 ({}): stage = contiguous layers"
_ON_PAPER = "on paper: leantune train runs pipeline stages (dist.pp) with tp and ddp, not fsdp"


@pytest.mark.parametrize(
    ("layout", "header", "note"),
    [
        (dict(tp=2, world_size=2), "4 accumulation steps, tp 2 x pp 1 x dp 1 = 2 devices",
         f"{_SPLIT}; leantune train runs it (dist.tp)"),
        (dict(tp=2, pp=2, world_size=8, strategy="ddp"),
         "tp 2 x pp 2 x dp 2 (ddp) = 8 devices, 1f1b over 4 micro-batches",
         f"{_SPLIT}; {_PP.format('1f1b')}; {_PP_RUNS}"),
        (dict(pp=2, world_size=2, schedule="gpipe"),
         "tp 1 x pp 2 x dp 1 = 2 devices, gpipe over 4 micro-batches", f"{_PP.format('gpipe')}; {_PP_RUNS}"),
        (dict(pp=2, world_size=4, strategy="fsdp"),
         "tp 1 x pp 2 x dp 2 (fsdp) = 4 devices, 1f1b over 4 micro-batches",
         f"{_PP.format('1f1b')}; {_ON_PAPER}"),
        # fsdp over one replica shards nothing: what dist.pp runs
        (dict(pp=2, world_size=2, strategy="fsdp"),
         "tp 1 x pp 2 x dp 1 = 2 devices, 1f1b over 4 micro-batches", f"{_PP.format('1f1b')}; {_PP_RUNS}"),
    ],
)  # fmt: skip
def test_the_table_of_a_parallel_layout_line_by_line(layout, header, note):
    shape = _shapes()["formulas"]
    setup = TrainSetup(
        optimizer="adalomo", dtype="bf16", seq_len=32, batch_size=2, accumulation_steps=4, **layout
    )
    est = estimate_memory(shape, setup)
    lines = est.format().splitlines()
    assert lines[0].endswith(f"seq 32 x batch 2, cpu, {header}")
    sent = [communication_per_step(shape, setup, i) for i in range(setup.pp)]
    busiest = max(range(setup.pp), key=lambda i: sum(sent[i].values()))
    where = f"one device of stage {busiest}" if setup.pp > 1 else "one device"
    comm = _comm_lines(sent[busiest], where)
    start = lines.index(comm[1]) - 1
    assert lines[start : start + len(comm)] == comm
    assert lines[start + len(comm) : start + len(comm) + 2] == ["", f"  layout: {note}"]
    data = est.to_dict()
    if setup.pp > 1:
        assert _stages_line(est.stage_totals) in lines
        assert data["stage"] == est.stage and data["stage_totals"] == est.stage_totals
    else:
        assert not any(line.startswith("  stages (GiB)") for line in lines)
        assert "stage" not in data and "stage_totals" not in data


def test_communication_with_four_tensor_parallel_ranks_and_fp32_pipeline_activations():
    """tp 4 (ring factor 2 * 3 / 4 = 1.5: tp 2's factor is 1, which hides a wrong factor), and
    mixed precision, whose pipeline sends fp32 hidden states."""
    shape = _shapes(num_key_value_heads=4)["formulas"]
    h, tokens, n = shape.hidden_size, 2 * 32, 4
    base = dict(optimizer="adalomo", dtype="bf16", seq_len=32, batch_size=2, accumulation_steps=n)
    c = communication_per_step(shape, TrainSetup(**base, tp=4, world_size=4))
    assert c["tp activations"] == int(n * 5 * 4 * tokens * h * 2 * 1.5)
    per_layer = 5 * (h + 3) + 2 * (h + 2)
    assert c["tp statistics"] == int(4 * 5 * per_layer * 1.5)
    mixed = TrainSetup(**{**base, "dtype": "mixed"}, pp=3, world_size=3)
    assert [communication_per_step(shape, mixed, i)["pp activations"] for i in range(3)] == [
        n * tokens * h * 4, 2 * n * tokens * h * 4, n * tokens * h * 4,
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["formulas", "family"])
def test_tp_statistics_count_the_biases_of_split_layers_only(how):
    """Biases of q/k/v/gate/up are split with their rows (AdaLomo sums their update and weight
    squares: 2 floats each); o/down keep their bias whole on every rank (nothing to sum)."""
    shape = _shapes(attention_bias=True, mlp_bias=True)[how]
    h = shape.hidden_size
    setup = TrainSetup(optimizer="adalomo", dtype="bf16", seq_len=32, batch_size=2, tp=2, world_size=2)
    per_layer = 5 * (h + 3) + 2 * (h + 2) + 5 * 2
    assert communication_per_step(shape, setup)["tp statistics"] == 4 * 5 * per_layer


def test_ddp_gradients_of_a_tied_model_count_the_shared_matrix_once():
    shape = _shapes(tie_word_embeddings=True)["formulas"]
    setup = TrainSetup(
        optimizer="adalomo", dtype="bf16", seq_len=32, batch_size=2, world_size=4, strategy="ddp"
    )
    assert communication_per_step(shape, setup) == {"ddp gradients": int(4 * shape.parameters * 2 * 3 / 4)}


def test_tp_checks_apply_to_tp_only_and_name_the_model_and_its_tensors():
    """A family without q/k/v/o projections (GPT-2) or with MoE experts (Mixtral) is refused for
    tp > 1 by name, but pipelines fine (pp 2, tp 1); a tied model splits by tp but not by pp."""
    from tests.families import tiny_config

    untied = tiny_config("gpt2", vocab_size=96, tie_word_embeddings=False)
    gpt2 = ModelShape.from_hf_config(untied.to_dict(), name="gpt2-tiny")
    moe = ModelShape.from_hf_config(tiny_config("mixtral", vocab_size=96).to_dict(), name="moe-tiny")
    for shape in (gpt2, moe):
        assert estimate_memory(shape, TrainSetup(pp=2, world_size=2)).stage_totals
    names = ", ".join(n for n, _ in gpt2.layer_tensors()[:3])
    messages = []
    for shape in (gpt2, moe):
        with pytest.raises(ValueError) as err:
            estimate_memory(shape, TrainSetup(tp=2, world_size=2))
        messages.append(str(err.value))
    assert messages == [
        "tp=2: the estimate splits LLaMA-style q/k/v/o and gate/up/down projections, and gpt2-tiny's "
        f"layers have none ({names}, ...)",
        "tp=2: moe-tiny has MoE experts, which dist.tp does not split",
    ]
    assert len(gpt2.layer_tensors()) > 3 and names.count(",") == 2
    tied = ModelShape.from_hf_config({**CONFIG, "tie_word_embeddings": True})
    assert estimate_memory(tied, TrainSetup(tp=2, world_size=2)).total > 0
    with pytest.raises(ValueError) as err:
        estimate_memory(tied, TrainSetup(pp=2, world_size=2))
    assert str(err.value) == (
        "pp > 1: the model ties its input and output embeddings, which would live on the first and the "
        "last stage; leantune.distributed.pipeline refuses that (untie them first)"
    )


@pytest.mark.parametrize(
    ("name", "style"),
    [
        ("q_proj", ("colwise", False)),
        ("q_proj.weight", ("colwise", False)),
        ("self_attn.k_proj.bias", ("colwise", True)),
        ("v_bias", ("colwise", True)),
        ("mlp.down_proj.weight", ("rowwise", False)),
        ("o_bias", ("rowwise", True)),
        ("input_layernorm.weight", (None, False)),
        ("mlp.experts.gate_up_proj", (None, False)),
    ],
)
def test_tp_style_reads_the_module_from_a_layer_tensors_name(name, style):
    from leantune.estimate import _tp_style

    assert _tp_style(name) == style


def test_fsdp_communication_with_mixed_precision_and_3d_experts():
    """Mixed precision all-gathers and reduce-scatters bf16 (FSDP2's MixedPrecisionPolicy), whatever
    the fp32 weights; AdaLomo's shard sums are one per column of each (rows, cols) view, plus 3, of
    every matrix, 2 per vector, counted on the real model's parameters (3-D experts included)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.families import tiny_config

    cfg = tiny_config("mixtral", vocab_size=96)
    torch.manual_seed(0)
    params = list(AutoModelForCausalLM.from_config(cfg).parameters())
    assert any(p.dim() == 3 and p.shape[1] != p.shape[-1] for p in params)
    shape = ModelShape.from_hf_config(cfg.to_dict())
    n = sum(p.numel() for p in params)
    setup = TrainSetup(optimizer="adalomo", dtype="mixed", seq_len=32, batch_size=2, accumulation_steps=2,
                       world_size=4, strategy="fsdp")  # fmt: skip
    floats = sum(p.shape[-1] + 3 if p.dim() >= 2 else 2 for p in params)
    assert communication_per_step(shape, setup) == {
        "fsdp weights/grads": int(3 * 2 * n * 2 * 3 / 4),
        "fsdp statistics": int(4 * floats * 2 * 3 / 4),
    }


@pytest.mark.parametrize("padded", [False, True])
def test_tp_activations_of_the_family_count_equal_the_formulas_padded_or_not(padded):
    """LLaMA counted on transformers' code and by the formulas agree byte for byte on one device;
    with tp 2 the family's layers lose exactly what the formulas split, for padded batches too
    (where k/v are repeated to every head and the mask is an L x L tensor)."""
    from leantune.estimate import _activations

    shapes = _shapes()
    setup = TrainSetup(optimizer="floor", dtype="bf16", seq_len=32, batch_size=1, padded=padded, tp=2,
                       world_size=2)  # fmt: skip
    (family, *_), (formulas, *_) = (_activations(shapes[k], setup) for k in ("family", "formulas"))
    assert family[1:] == formulas[1:]
    # the family counts RoPE's cos/sin (bf16, 32 x head_dim 16 each) in layer 0, the formulas beside
    assert family[0] - formulas[0] == 2 * 32 * 16 * 2


def test_fsdp_stages_hold_two_unsharded_layers_and_only_the_last_the_head():
    """pp 2 x fsdp 2: a stage's weights are its shard plus, unsharded, the two layers FSDP gathers
    at once, and on the last stage the head it gathers around the loss."""
    shape = _shapes()["formulas"]
    setup = TrainSetup(optimizer="adalomo", dtype="bf16", pp=2, world_size=4, strategy="fsdp", seq_len=64)
    run = replace(setup, loss_chunk=0)
    first, last = parts_of(shape, setup)
    stage0, stage1 = (_estimate_part(shape, run, p, _activations(shape, run)) for p in (first, last))
    layer, head = first.layer_parameters, shape.vocab_size * shape.hidden_size
    assert stage0.weights == first.parameters * 2 / 2 + 2 * layer * 2 / 2
    assert stage1.weights == last.parameters * 2 / 2 + (head + 2 * layer) * 2 / 2
    assert stage0.notes["weights"].endswith(" / 2 ranks + 2 layers unsharded")
    assert stage1.notes["weights"].endswith(" / 2 ranks + 2 layers and the head unsharded")


def test_ddp_with_one_replica_keeps_no_bucket_copy_of_the_gradients():
    """leantune does not wrap a single replica in DistributedDataParallel (nothing to average)."""
    shape = _shapes()["formulas"]
    base = dict(optimizer="adamw", dtype="bf16", seq_len=32)
    one = estimate_memory(shape, TrainSetup(**base, strategy="ddp", world_size=1))
    plain = estimate_memory(shape, TrainSetup(**base))
    assert one.gradients == plain.gradients and one.total == plain.total
    two = estimate_memory(shape, TrainSetup(**base, strategy="ddp", world_size=2))
    assert two.gradients > plain.gradients
