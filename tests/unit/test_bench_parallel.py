"""benchmarks/parallel.py without running it: the communication counter (on a one-rank gloo group
and on tensor parallelism in threads, against the closed form), the closed forms, the options and
their refusals, and the report rendered from made-up results."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("parallel")  # benchmarks/ is on pytest's pythonpath


@pytest.mark.parametrize(
    ("namespace", "name", "kind"),
    [
        ("c10d", "allreduce_", "all_reduce"),
        ("c10d", "_allgather_base_", "all_gather_into_tensor"),
        ("c10d", "_reduce_scatter_base_", "reduce_scatter_tensor"),
        ("c10d", "broadcast_", "broadcast"),
        ("c10d", "send", "send"),
        ("c10d", "recv_", "recv"),
        ("_c10d_functional", "all_reduce", "all_reduce (functional)"),
        ("_c10d_functional", "all_gather_into_tensor", "all_gather_into_tensor (functional)"),
        ("_c10d_functional", "wait_tensor", None),
        ("_c10d_functional", "_wrap_tensor_autograd", None),
        ("c10d", "barrier", None),
        ("aten", "mm", None),
    ],
)
def test_comm_kind_names_the_call_and_its_layer(bench, namespace, name, kind):
    assert bench.comm_kind(namespace, name) == kind


@pytest.fixture
def one_rank_gloo():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_counter_sees_torch_distributed_and_functional_calls_with_their_bytes(bench, one_rank_gloo):
    import torch.distributed._functional_collectives as funcol

    counter = bench.comm_counter()
    with counter:
        dist.all_reduce(torch.ones(10))
        dist.all_reduce(torch.ones(2, 3, dtype=torch.float64))
        dist.all_gather_into_tensor(torch.empty(5), torch.ones(5))
        dist.broadcast(torch.ones(7, dtype=torch.bfloat16), src=0)
        funcol.wait_tensor(funcol.all_reduce(torch.ones(3), "sum", dist.group.WORLD))
        torch.ones(4) @ torch.ones(4)  # not communication
    assert counter.snapshot() == {
        "all_reduce": {"calls": 2, "bytes": 40 + 48},
        "all_gather_into_tensor": {"calls": 1, "bytes": 20},
        "broadcast": {"calls": 1, "bytes": 14},
        "all_reduce (functional)": {"calls": 1, "bytes": 12},
    }
    counter.reset()
    assert counter.snapshot() == {}


def test_counter_on_tensor_parallel_matches_the_closed_form(bench):
    """DTensor's collectives never pass through torch.distributed's Python functions: the counter
    must see them, 2 all-reduces per layer in forward and 5 in backward."""
    from torch.distributed.device_mesh import init_device_mesh

    from leantune.distributed.tensor_parallel import apply_tensor_parallel
    from leantune.models import build_model
    from tests.threaded import run_ranks

    batch, seq = 2, 8
    models = [build_model(preset="test", seed=0) for _ in range(2)]  # not in the threads (imports)

    def rank_fn(rank):
        model = models[rank]
        apply_tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
        ids = torch.randint(
            0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
        )
        counter = bench.comm_counter()
        with counter:
            model(input_ids=ids, labels=ids).loss.backward()
        return counter.snapshot()

    cf = bench.closed_form("test", seq, batch, microbatches=2)
    want = {k: cf["tp2_forward_all_reduce"][k] + cf["tp2_backward_all_reduce"][k] for k in ("calls", "bytes")}
    assert want["calls"] == 2 * 4  # 2 layers: o and down in forward, attention and MLP inputs in backward
    for got in run_ranks(2, rank_fn):
        assert got == {"all_reduce (functional)": want}


@pytest.mark.parametrize("preset", ["test", "tiny"])
def test_closed_form_weights_are_the_models(bench, preset):
    from leantune.models import build_model

    model = build_model(preset=preset, seed=0)
    assert bench.closed_form(preset, 8, 2, 2)["weight_bytes"] == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )


def test_defaults_are_the_issues_measurement(bench):
    args = bench.parse_args([])
    assert (args.preset, args.seq, args.batch, args.steps, args.warmup, args.microbatches) == (
        "0.1b",
        256,
        4,
        3,
        1,
        4,
    )
    assert args.layouts == ["one", "tp2", "pp2", "fsdp2"]
    assert bench.parse_args(["--only", "pp2,one", "--batch", "6", "--microbatches", "3"]).layouts == [
        "pp2",
        "one",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "0.1c"], r"--preset: unknown preset '0.1c'"),
        (["--steps", "0"], r"--steps must be >= 1"),
        (["--seq", "1"], r"--seq must be >= 2"),
        (["--warmup", "0"], r"--warmup must be >= 1: the first pipeline step"),
        (["--batch", "3", "--microbatches", "3"], r"--batch 3: fsdp2 splits the global batch"),
        (["--microbatches", "1"], r"--microbatches must be >= 2: 1F1B"),
        (["--batch", "6"], r"--batch 6 is not a multiple of --microbatches 4"),
        (["--preset", "tiny"], r"--preset tiny ties its embeddings"),
        (["--only", "tp3"], r"unknown configuration 'tp3'. Did you mean 'tp2'\?"),
    ],
)
def test_refusals_name_the_option(bench, argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.parse_args(argv)


def test_a_refused_layout_left_out_is_no_refusal(bench):
    assert bench.parse_args(["--preset", "tiny", "--only", "one,tp2,fsdp2"]).layouts == [
        "one",
        "tp2",
        "fsdp2",
    ]
    assert bench.parse_args(["--batch", "3", "--microbatches", "3", "--only", "one,pp2"]).batch == 3


def _record(rank, losses, *, rss, seconds, comm):
    return {
        "rank": rank,
        "param_bytes": 1000,
        "local_param_bytes": 2**30 if comm is None else 2**29,
        "peak_rss_bytes": rss,
        "start_rss_bytes": rss // 2,
        "step_seconds": seconds,
        "losses": losses,
        "comm_per_step": [comm or {}] * len(seconds),
    }


def _report(bench):
    gib = 2**30
    ar = {
        "all_reduce (functional)": {"calls": 48, "bytes": 150_994_944},
        "all_reduce": {"calls": 3, "bytes": 12},
    }
    raw = {
        "one": {"ranks": [_record(0, [4.0, 3.0], rss=2 * gib, seconds=[10.0, 12.0, 11.0], comm=None)]},
        "tp2": {
            "ranks": [
                _record(r, [4.0, 3.0 * (1 + 1e-6)], rss=gib, seconds=[15.0 + r, 14.0, 16.0 + r], comm=ar)
                for r in (0, 1)
            ]
        },
        # fsdp2 ranks hold their halves' losses: the layout's is their mean (here off by 1e-3)
        "fsdp2": {
            "ranks": [
                _record(
                    0, [4.1, 2.9], rss=gib, seconds=[30.0] * 3, comm={"send": {"calls": 4, "bytes": 2048}}
                ),
                _record(
                    1, [3.9, 3.106], rss=gib, seconds=[30.0] * 3, comm={"recv": {"calls": 4, "bytes": 2048}}
                ),
            ]
        },
        "pp2": {"error": "killed by SIGKILL (out of memory?)", "detail": "..."},
    }
    rows, ref = [], None
    for name in ("one", "tp2", "pp2", "fsdp2"):
        row = bench.summarise(name, raw[name], ref)
        ref = row if name == "one" else ref
        rows.append(row)
    cf = bench.closed_form("0.1b", 256, 4, 4)
    return {
        "command": "python benchmarks/parallel.py",
        "date": "2026-01-01",
        "machine": {"torch": "2.13.0", "cpu_model": "Some CPU", "cpus": 2},
        "load_before": [1.0, 2.0, 3.0],
        "load_after": None,
        "settings": {
            "preset": "0.1b",
            "seq": 256,
            "batch": 4,
            "steps": 3,
            "warmup": 1,
            "microbatches": 4,
            "lr": 1e-3,
            "rtol": 1e-4,
        },
        "closed_form": cf,
        "rows": rows,
        "checks": bench.checks(rows, cf),
        "source": {"package": "/x", "digest": "abc", "git_commit": "1234567", "uncommitted": []},
    }


def test_summarise_takes_medians_the_slowest_rank_and_the_mean_loss(bench):
    report = _report(bench)
    one, tp, pp, fsdp = report["rows"]
    assert one["step_seconds"] == 11.0 and tp["step_seconds"] == 16.0  # the slower rank's median
    assert tp["loss_equal"] and tp["loss_max_rel_diff"] == pytest.approx(1e-6)
    assert fsdp["losses"] == pytest.approx([4.0, 3.003]) and not fsdp["loss_equal"]
    assert fsdp["per_rank"][1]["comm_per_step"] == {"recv": {"calls": 4, "bytes": 2048}}
    assert pp["error"].startswith("killed")


def test_render_from_a_made_up_result(bench):
    report = _report(bench)
    text = bench.render(report)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert (
        "| 1 | 1.000 GiB | 1.00 GiB | 2.00 GiB | 1.00 | 11.00 | 1.00 | none | 3.000000 | reference |"
        in (rows["one rank"])
    )
    tp = rows["tensor parallel"]
    assert "| 1.00 GiB / 1.00 GiB | 0.50 | 16.00 | 1.45 |" in tp
    assert "rank 0: **151.0 MB**: all_reduce (functional) 48x 151.0 MB; all_reduce 3x 12 B<br>rank 1:" in tp
    assert "yes (max rel. diff 1.0e-06)" in tp
    assert "failed: killed by SIGKILL (out of memory?)" in rows["pipeline (1F1B)"]
    assert "**NO** (max rel. diff 1.0e-03)" in rows["FSDP2"]
    assert "rank 0: **2.0 kB**: send 4x 2.0 kB<br>rank 1: **2.0 kB**: recv 4x 2.0 kB" in rows["FSDP2"]
    assert "shared" in text and "2 CPU cores" in text  # the noise caveat
    assert "load average 1.00 / 2.00 / 3.00 before, ? after" in text
    # the checks: the guard that failed, the closed forms met and missed
    assert "- fsdp2: losses differ from one rank's (max rel. diff 1.0e-03)" in text
    assert (
        "tp2 rank 1: all-reduce (DTensor, 2 + 2 per layer) 48 calls, 150,994,944 B per step; closed form 48 "
        in (text)
    )
    assert "closed form 48 calls, 150,994,944 B: equal" in text
    assert (
        "fsdp2 rank 0: all-gather 0 calls, 0 B per step; closed form 29 calls, 1,072,843,776 B: NOT equal"
        in text
    )
    assert "- Code: leantune from git 1234567" in text
