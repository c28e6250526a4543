"""Two CPU ranks (gloo, torchrun) against one: DDP and FSDP2 with the fused optimizers.

Equal-length packed text makes the mean of per-rank mean losses equal the global mean, so a
2-rank run and a 1-rank run on the same global batch must reach the same weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "in",
    "an",
    "old",
    "green",
    "tree",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# glibc keeps freed blocks above its (adaptive) mmap threshold in the heap: without a fixed
# threshold, RSS reflects the allocator's history more than the live tensors.
MEMORY_ENV = {**ENV, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    with path.open("w") as fh:
        for _ in range(300):
            fh.write(
                json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))}) + "\n"
            )
    return path


def common(text_file: Path, out: Path) -> list[str]:
    return [
        "model.preset=test",
        f"data.train={text_file}",
        "data.max_length=32",
        "data.num_eval=8",
        "train.max_steps=6",
        "optim.warmup_steps=2",
        "eval.every=0",
        "eval.accuracy_samples=0",
        "log.every=1",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        f"train.output_dir={out}",
    ]


def launch(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "leantune", "train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "leantune",
            "train",
            *args,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def losses(run_dir: Path) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def assert_weights_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


OPTIMIZERS = {
    "adalomo": ["optim.name=adalomo", "optim.lr=0.05"],
    "lomo-clip": ["optim.name=lomo", "optim.lr=0.05", "optim.clip_grad_norm=0.5"],
    "adamw": ["optim.name=adamw", "optim.lr=0.003"],
}


@pytest.fixture(scope="module")
def reference(text_file, tmp_path_factory):
    """One-rank runs with the global batch (8) of the two-rank runs (2 x 4)."""
    out = tmp_path_factory.mktemp("ref")
    runs = {}
    for name, opt in OPTIMIZERS.items():
        launch([*common(text_file, out), *opt, "train.batch_size=8", f"train.run_name={name}"], 1)
        runs[name] = out / name
    return runs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_ranks_equal_one_rank_on_the_same_global_batch(text_file, reference, tmp_path, strategy, name):
    launch(
        [
            *common(text_file, tmp_path),
            *OPTIMIZERS[name],
            "train.batch_size=4",
            f"dist.strategy={strategy}",
            "train.run_name=r",
        ],
        2,
    )
    run = tmp_path / "r"
    assert_weights_close(final_weights(run), final_weights(reference[name]))
    torch.testing.assert_close(
        torch.tensor(losses(run)), torch.tensor(losses(reference[name])), rtol=1e-5, atol=1e-6
    )


LOW_PRECISION = {
    "bf16-stochastic": [
        "model.dtype=bf16",
        "optim.name=adalomo",
        "optim.lr=0.05",
        "optim.rounding=stochastic",
    ],  # fmt: skip
    "fp16-dynamic": ["model.dtype=fp16", "optim.name=lomo", "optim.lr=0.05", "optim.loss_scale=dynamic"],
}


@pytest.fixture(scope="module")
def low_precision_reference(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("low")
    for name, opt in LOW_PRECISION.items():
        launch([*common(text_file, out), *opt, "train.batch_size=8", f"train.run_name={name}"], 1)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_low_precision_two_ranks_track_one_rank(text_file, low_precision_reference, tmp_path, strategy, name):
    """bf16 weights with stochastic rounding and fp16 weights with dynamic loss scaling on 2 ranks
    against 1 rank on the same global batch. Not bitwise: the low-precision gradients of two
    half-batches round differently from one full batch, and under fsdp each shard draws its own
    rounding noise. Measured here: losses within 1.5e-4 (relative; allowed 5e-4), weights within
    0.024 of each tensor's largest magnitude (3 bf16 ulps there; allowed 0.04) and 0.003 in fp16
    (allowed 0.006)."""
    launch([*common(text_file, tmp_path), *LOW_PRECISION[name], "train.batch_size=4",
            f"dist.strategy={strategy}", "train.run_name=r"], 2)  # fmt: skip
    got, want = final_weights(tmp_path / "r"), final_weights(low_precision_reference / name)
    dtype = torch.bfloat16 if name.startswith("bf16") else torch.float16
    assert got.keys() == want.keys() and all(t.dtype == dtype for t in got.values())
    scale = 0.04 if dtype == torch.bfloat16 else 0.006
    for k in want:
        bound = scale * want[k].float().abs().max().item()
        assert (got[k].float() - want[k].float()).abs().max().item() <= bound, k
    assert losses(tmp_path / "r")[-1] < losses(tmp_path / "r")[0]
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "r")), torch.tensor(losses(low_precision_reference / name)),
        rtol=5e-4, atol=0,
    )  # fmt: skip


def test_accumulation_on_two_ranks_equals_one_rank(text_file, reference, tmp_path):
    launch(
        [
            *common(text_file, tmp_path),
            *OPTIMIZERS["adalomo"],
            "train.batch_size=2",
            "train.accumulation_steps=2",
            "dist.strategy=fsdp",
            "train.run_name=r",
        ],
        2,
    )
    assert_weights_close(final_weights(tmp_path / "r"), final_weights(reference["adalomo"]))


def truncate_to_checkpoint(run: Path, step: int) -> None:
    """Make a finished run look as if it had stopped right after saving ``step``."""
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "final")


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_sharded_checkpoint_resumes_on_another_number_of_ranks(text_file, reference, tmp_path, first, second):
    def args(nproc: int) -> list[str]:
        batch = 8 // nproc
        strategy = "fsdp" if nproc > 1 else "none"
        return [
            *common(text_file, tmp_path),
            *OPTIMIZERS["adalomo"],
            f"train.batch_size={batch}",
            f"dist.strategy={strategy}",
            "train.run_name=r",
            "train.save_every=3",
            "train.keep_last=3",
        ]

    launch(args(first), first)
    truncate_to_checkpoint(tmp_path / "r", 3)
    proc = launch([*args(second), "train.resume=auto"], second)
    assert "resumed from" in proc.stdout and "step-000003" in proc.stdout
    assert_weights_close(final_weights(tmp_path / "r"), final_weights(reference["adalomo"]))
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "r")), torch.tensor(losses(reference["adalomo"])), rtol=1e-5, atol=1e-6
    )


ADAPTED = {
    "lora": ["peft.method=lora"],
    "ia3": ["peft.method=ia3"],
    "hft": ["train.hft=true"],
}
ADAPTED_CASES = [("ddp", "lora"), ("fsdp", "lora"), ("fsdp", "ia3"), ("ddp", "hft"), ("fsdp", "hft")]


@pytest.fixture(scope="module")
def adapted_reference(text_file, tmp_path_factory):
    """One-rank runs with the global batch of the two-rank runs, one per PEFT/HFT setting used."""
    out = tmp_path_factory.mktemp("adapted")
    for name in sorted({name for _, name in ADAPTED_CASES}):
        launch([*common(text_file, out), *OPTIMIZERS["adalomo"], *ADAPTED[name], "train.batch_size=8",
                f"train.run_name={name}"], 1)  # fmt: skip
    return out


def adapted_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    adapter = run_dir / "final" / "adapter_model.safetensors"
    return load_file(str(adapter)) if adapter.is_file() else final_weights(run_dir)


@pytest.mark.parametrize(("strategy", "name"), ADAPTED_CASES, ids=[f"{s}-{n}" for s, n in ADAPTED_CASES])
def test_adapters_and_hft_on_two_ranks_resume_and_equal_one_rank(
    text_file, adapted_reference, tmp_path, strategy, name
):
    """peft adapters and HFT under ddp / fsdp: trained, saved (base model gathered from the shards),
    interrupted after step 3 and resumed (adapter weights loaded into the shards), the result equals
    an uninterrupted one-rank run."""
    args = [
        *common(text_file, tmp_path),
        *OPTIMIZERS["adalomo"],
        *ADAPTED[name],
        "train.batch_size=4",
        f"dist.strategy={strategy}",
        "train.run_name=r",
        "train.save_every=3",
        "train.keep_last=3",
    ]
    launch(args, 2)
    run, ref = tmp_path / "r", adapted_reference / name
    if name != "hft":  # the base model of a preset run is written once, gathered from the shards
        assert_weights_close(load_file(str(run / "base" / "model.safetensors")),
                             load_file(str(ref / "base" / "model.safetensors")), rtol=0, atol=0)  # fmt: skip
    truncate_to_checkpoint(run, 3)
    proc = launch([*args, "train.resume=auto"], 2)
    assert "resumed from" in proc.stdout and "step-000003" in proc.stdout
    got, want = adapted_weights(run), adapted_weights(ref)
    assert (name == "hft") == ("lm_head.weight" in want or "model.embed_tokens.weight" in want)
    assert_weights_close(got, want)
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(ref)), rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_different_global_batch(text_file, tmp_path):
    base = [*common(text_file, tmp_path), *OPTIMIZERS["adalomo"], "train.run_name=r", "train.save_every=3"]
    launch([*base, "train.batch_size=4", "train.max_steps=3"], 1)
    cmd = [
        sys.executable,
        "-m",
        "leantune",
        "train",
        *base,
        "train.batch_size=4",
        "train.resume=auto",
        "train.accumulation_steps=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2
    assert "train.accumulation_steps: run has 1, now 2" in proc.stderr


WORKER = Path(__file__).with_name("replica_worker.py")


@pytest.mark.parametrize("sync", ["collectives", "collectives-bf16", "none"])
def test_ddp_replicas_stay_identical_after_every_step(tmp_path, sync):
    """The peers' defect: fused updates without a gradient all-reduce let replicas drift apart.
    ``collectives-bf16``: bf16 weights with stochastic rounding, whose noise must be the same draw
    on every replica (else they drift apart by one rounding step per update)."""
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(WORKER),
        sync,
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    if sync.startswith("collectives"):
        assert report["max_diff_per_step"] == [0.0] * report["steps"]
        assert report["changed_elements"] > 0.5  # it trained (most bf16 weights moved)
    else:
        assert max(report["max_diff_per_step"]) > 1e-3  # what the peer stacks silently do


def test_fsdp_shards_weights_and_lowers_per_rank_memory(tmp_path):
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(WORKER.with_name("memory_worker.py")),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=MEMORY_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(WORKER.with_name("memory_worker.py")), str(tmp_path / "one.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=MEMORY_ENV,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = json.loads(out.read_text())
    single = json.loads((tmp_path / "one.json").read_text())
    assert two["local_param_bytes"] <= 0.51 * single["local_param_bytes"]
    # Measured here: 1140 MiB for one process, 947 MiB per FSDP rank (weights 670 MB -> 335 MB).
    assert two["peak_rss_bytes"] < single["peak_rss_bytes"] - 100 * 2**20


USER_LOOP = Path(__file__).with_name("user_loop_worker.py")


def run_user_loop(tmp_path: Path, mode: str) -> dict:
    out = tmp_path / f"{mode}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(USER_LOOP),
        mode,
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["adalomo", "lomo-clip", "adamw-in-backward"])
def test_a_plain_optimizer_on_a_users_fully_shard_model_equals_one_process(tmp_path, mode):
    """The user shards the model with fully_shard and builds AdaLomo(model): no leantune trainer and
    no distributed argument. AdaLomo's row/column statistics and RMS, and LOMO's clipping norm, must
    be those of the whole tensors (summed over the shards), not of one shard."""
    from tests.distributed.user_loop_common import STEPS, global_batch, tiny_model
    from tests.distributed.user_loop_worker_ref import OPTIMIZERS

    report = run_user_loop(tmp_path, mode)
    assert report["collectives"] == "ShardedCollectives"
    model = tiny_model()
    opt = OPTIMIZERS[mode](model)
    for step in range(STEPS):
        ids, labels = global_batch(step)
        opt.backward(model(input_ids=ids, labels=labels).loss)
    got = load_file(str(tmp_path / f"{mode}.json.safetensors"))
    # AdamW divides by sqrt(v): where v is near zero the two ranks' summation order shows (seen:
    # one element of 2048 off by 3e-6 on this machine, at HEAD too); the others are exact to 1e-6.
    atol = 5e-6 if mode == "adamw-in-backward" else 1e-6
    assert_weights_close(got, {n: p.detach() for n, p in model.named_parameters()}, atol=atol)


def test_replicated_lomo_equals_torch_ddp_with_sgd(tmp_path):
    """ddp's gradient is the mean over the ranks: LOMO (no clipping: plain SGD, whose update scales
    with the gradient) with leantune's replicated collectives against torch's own DDP + SGD, on the
    same replicas and micro-batches."""
    from tests.distributed.user_loop_common import tiny_model

    report = run_user_loop(tmp_path, "lomo-replicated")
    got = load_file(str(tmp_path / "lomo-replicated.json.safetensors"))
    want = load_file(str(tmp_path / "lomo-replicated.json.ref.safetensors"))
    assert_weights_close(got, want)
    start = {n: p.detach() for n, p in tiny_model().named_parameters()}
    assert max((got[n] - start[n]).abs().max().item() for n in got) > 1e-3  # it trained
    assert report == {}


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("ddp", r"cannot run inside DistributedDataParallel.*collectives='replicated'"),
        (
            "plain",
            r"one of 2 ranks and the parameters are plain.*collectives='replicated'.*collectives='local'",
        ),
    ],
)
def test_ddp_wrapped_or_unchosen_replicated_models_are_refused(tmp_path, mode, message):
    import re

    error = run_user_loop(tmp_path, mode)["error"]
    assert error is not None and re.search(message, error, re.S), error


def test_fsdp_fp16_overflow_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """An inf gradient on rank 1 only (fp16 weights sharded by FSDP2, LOMO with dynamic loss
    scaling): both ranks skip that step with no shard changed, halve the scale, and train on."""
    out = tmp_path / "overflow.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER.with_name("overflow_worker.py")), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    fault = report["fault_step"]
    for rank, steps in enumerate(report["ranks"]):
        assert all(s["loss_finite"] and s["finite"] for s in steps), (rank, steps)
        for i, s in enumerate(steps):
            if i == fault:
                assert s["skipped"] and not s["updated"] and s["changed"] == 0, (rank, s)
            else:
                assert s["updated"] and not s["skipped"] and s["changed"] > 0, (rank, i, s)
        assert steps[fault + 1]["loss_scale"] == steps[fault]["loss_scale"] / 2, rank
        assert steps[fault - 1]["loss_scale"] == steps[fault]["loss_scale"], rank
    ours, theirs = ([(s["loss_scale"], s["skipped"]) for s in steps] for steps in report["ranks"])
    assert ours == theirs


def test_fsdp_evaluates_exact_match_on_every_rank(tmp_path):
    """Generation through an FSDP2 model is collective: every rank must generate the same prompts
    in step (rank 0 alone crashed in gloo with a collective mismatch)."""
    args = ["model.preset=test", "train.batch_size=4", "train.max_steps=2", "eval.every=0",
            "eval.accuracy_samples=4", "eval.max_new_tokens=4", "dist.strategy=fsdp",
            "log.progress=false", "log.tensorboard=false", "log.plot=false",
            f"train.output_dir={tmp_path}", "train.run_name=r"]  # fmt: skip
    proc = launch(args, 2)
    assert "exact match: all" in proc.stdout
