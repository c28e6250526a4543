"""Every supported model family through the CLI, as a user would bring it: a local model directory
(tiny random model, BPE tokenizer with a Llama-3-style chat template) and chat data.

Per family: full training, the exported model reloaded by plain transformers and equal to the
trained one, eval and generate on the run, HFT (the mask saved, its fraction counted), LoRA on
all linear layers (experts too on MoE models), and ``leantune estimate`` on the directory. The
two-rank FSDP runs and the adapter merges cover a representative subset (they cost a torchrun
each); ``benchmarks/families.py`` runs the whole matrix and records it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leantune import hft
from leantune.cli import main
from tests.families import FAMILIES, MOE_FAMILIES, save_family, write_chat_data
from tests.helpers import stop_at

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("families")
    dirs = {family: save_family(family, root / family) for family in FAMILIES}
    return dirs, write_chat_data(root / "chat.jsonl", n=32)


@pytest.fixture(scope="module")
def packed_text(tmp_path_factory) -> Path:
    """Plain text, packed into full sequences: every rank's micro-batch has the same number of
    target tokens, so the mean of per-rank mean losses is the global mean (as in test_multirank)."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "text.jsonl"
    words = ["the", "model", "learns", "to", "add", "sort", "reverse", "count", "numbers", "and", "letters"]
    path.write_text(
        "".join(json.dumps({"text": " ".join(rng.choices(words, k=40))}) + "\n" for _ in range(200))
    )
    return path


def common(model: Path, data: Path, out: Path, name: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.train={data}",
        "data.max_length=64",
        "data.num_eval=8",
        "train.batch_size=4",
        "train.max_steps=2",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "eval.every=0",
        "eval.accuracy_samples=2",
        "eval.max_new_tokens=4",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        f"train.output_dir={out}",
        f"train.run_name={name}",
    ]


def run_cli(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = main(argv)
    assert code == 0, buf.getvalue()[-3000:]
    return buf.getvalue()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_training_reloads_in_transformers_evaluates_and_generates(family_dirs, tmp_path, family):
    from transformers import AutoModelForCausalLM

    dirs, data = family_dirs
    log = run_cli(["train", *common(dirs[family], data, tmp_path, "full")])
    assert "attention: " in log
    final = tmp_path / "full" / "final"
    reloaded = AutoModelForCausalLM.from_pretrained(final, local_files_only=True).eval()
    trained = load_file(str(final / "model.safetensors"))
    initial = load_file(str(dirs[family] / "model.safetensors"))
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)  # it trained
    state = {k: v for k, v in reloaded.state_dict().items() if k in trained}
    assert all(torch.equal(state[k], trained[k]) for k in state)
    run_cli(["eval", str(tmp_path / "full")])
    out = run_cli(["generate", str(tmp_path / "full"), "add 2+3", "hi", "--max-new-tokens", "3", "--chat"])
    assert "### 'add 2+3'" in out and "### 'hi'" in out  # a random model may well answer blanks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hft_saves_its_mask_and_counts_the_fraction_on_any_layout(family_dirs, tmp_path, family):
    dirs, data = family_dirs
    log = run_cli(["train", *common(dirs[family], data, tmp_path, "hft"), "train.hft=true"])
    (entry,) = json.loads((tmp_path / "hft" / "final" / hft.STATE_FILE).read_text())["history"]
    assert 0.25 < entry["trainable_fraction"] < 0.75
    assert f"{entry['trainable_parameters']:,} of {entry['total_parameters']:,} parameters trainable" in log


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_all_linear_trains_every_family(family_dirs, tmp_path, family):
    dirs, data = family_dirs
    log = run_cli(["train", *common(dirs[family], data, tmp_path, "lora"), "peft.method=lora"])
    adapter = json.loads((tmp_path / "lora" / "final" / "adapter_config.json").read_text())
    if family in MOE_FAMILIES:  # experts (3-D tensors) adapted as parameters, and said so
        assert any("experts" in t for t in adapter["target_parameters"])
        assert "experts and routers adapted as parameters" in log
    else:
        assert not adapter.get("target_parameters")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_estimate_reads_every_family_directory(family_dirs, capsys, family):
    dirs, _ = family_dirs
    assert main(["estimate", "--model", str(dirs[family]), "--seq", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dirs[family], local_files_only=True)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["notes"]["model"].startswith("parameters and activations counted on the family's own")


@pytest.mark.parametrize("family", ["gpt2", "mixtral", "qwen2_moe"])
def test_lora_merges_into_a_model_transformers_loads(family_dirs, tmp_path, family):
    from transformers import AutoModelForCausalLM

    dirs, data = family_dirs
    run_cli(["train", *common(dirs[family], data, tmp_path, "lora"), "peft.method=lora"])
    run_cli(["merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(dirs[family], local_files_only=True)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())


def test_an_explicit_sdpa_the_family_lacks_is_a_config_error(family_dirs, tmp_path):
    dirs, data = family_dirs
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = main(["train", *common(dirs["gemma2"], data, tmp_path, "x"), "model.attn_implementation=sdpa"])
    assert code == 2
    assert "attn_implementation=sdpa: Gemma2ForCausalLM (gemma2) has no sdpa attention" in buf.getvalue()
    log = run_cli(["train", *common(dirs["gemma2"], data, tmp_path, "auto")])
    assert "attention: eager (auto: the family has no sdpa)" in log


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("family", "extra"),
    [
        # GPT-2's key bias has a zero gradient (softmax ignores a constant added to every score):
        # AdaLomo's elementwise normalisation turns its rounding noise into full-size steps, which
        # differ with the order of any reduction. LOMO (SGD) compares the ranks exactly.
        ("gpt2", ["optim.name=lomo", "optim.lr=0.1"]),
        ("mixtral", []),
        ("phi3", ["train.hft=true"]),
    ],
    ids=["gpt2-lomo", "mixtral", "phi3-hft"],
)
def test_fsdp_on_two_ranks_equals_one_rank(family_dirs, packed_text, tmp_path, family, extra):
    """FSDP2 finds the blocks of GPT-2 (transformer.h, tied head) and of a MoE model; HFT on Phi-3's
    fused tensors keeps its segments exact on shards, across a save and a resume on two ranks."""
    dirs, _ = family_dirs
    base = [*common(dirs[family], packed_text, tmp_path, "r"), "data.format=text", "optim.lr=0.01",
            "eval.accuracy_samples=0", "train.max_steps=4", "log.every=1", *extra]  # fmt: skip
    one = [*base, "train.batch_size=8", "train.run_name=one"]
    run_cli(["train", *one])
    two = [*base, "train.batch_size=4", "dist.strategy=fsdp", "train.save_every=2", "train.keep_last=3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*torchrun, "-m", "leantune", "train", *two]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if extra:  # interrupt after step 2 and resume on two ranks: the segments' state is restored
        import shutil

        shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-000004")
        shutil.rmtree(tmp_path / "r" / "final")
        resume = [*cmd, "train.resume=auto"]
        proc = subprocess.run(resume, capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "r" / "final" / "model.safetensors"))
    want = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    ("family", "method"),
    [("gpt2", ["peft.method=ia3"]), ("falcon", ["peft.method=ia3"]), ("phi3", ["peft.use_dora=true"]),
     ("gpt_neox", ["peft.use_dora=true"]), ("mixtral", ["peft.method=ia3"])],
    ids=["gpt2-ia3", "falcon-ia3", "phi3-dora", "gpt_neox-dora", "mixtral-ia3"],
)  # fmt: skip
def test_ia3_and_dora_on_other_layouts(family_dirs, tmp_path, family, method):
    dirs, data = family_dirs
    extra = method if method != ["peft.use_dora=true"] else ["peft.method=lora", *method]
    log = run_cli(["train", *common(dirs[family], data, tmp_path, "a"), *extra])
    assert (tmp_path / "a" / "final" / "adapter_model.safetensors").is_file()
    if family == "mixtral":
        assert "ia3 scales nn.Linear layers only: the experts' 3-D tensors are not adapted" in log


def test_dora_on_moe_experts_is_refused_with_the_way_out(family_dirs, tmp_path):
    dirs, data = family_dirs
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = main(
            ["train", *common(dirs["mixtral"], data, tmp_path, "d"), "peft.method=lora", "peft.use_dora=true"]
        )
    assert code == 2
    want = r"peft\.use_dora=true on mixtral: peft has no DoRA .*peft\.target_modules=\[q_proj,v_proj\]"
    assert re.search(want, buf.getvalue()), buf.getvalue()
    assert not (tmp_path / "d" / "final").exists()


def test_hft_on_fused_tensors_resumes_exactly(family_dirs, tmp_path):
    """Interrupted after 3 of 6 steps and resumed: the mask, the segments' AdaLomo state (with a
    redraw per epoch) and the weights equal an uninterrupted run bitwise."""

    from leantune.config import load_config
    from leantune.trainer import Trainer

    dirs, data = family_dirs
    args = [*common(dirs["phi3"], data, tmp_path, "r"), "train.hft=true", "train.hft_redraw=epoch",
            "train.max_steps=6", "train.batch_size=8", "eval.accuracy_samples=0", "log.every=1"]  # fmt: skip
    full = Trainer(load_config(None, [*args, "train.run_name=full"])).run()
    assert Trainer(load_config(None, args), hooks=[stop_at(3)]).run().interrupted
    resumed = Trainer(load_config(None, [*args, "train.resume=auto"])).run()
    a, b = (load_file(str(s.final_dir / "model.safetensors")) for s in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (json.loads((s.final_dir / hft.STATE_FILE).read_text())["history"] for s in (full, resumed))
    assert ha == hb and any(h["frozen_parts"] for h in ha) and len(ha) >= 2  # redrawn per epoch
