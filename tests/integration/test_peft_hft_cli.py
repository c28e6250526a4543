"""End to end through the CLI: LoRA + AdaLomo (adapters saved, base untouched, eval / generate /
merge on the adapter run) and HFT (mask saved, frozen matrices untouched, stages, resume)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from leantune import hft
from leantune.cli import main
from leantune.config import load_config
from leantune.data import load_tokenizer
from leantune.inference import load_for_inference
from leantune.models import build_model
from leantune.trainer import Trainer
from tests.helpers import stop_at

TINY = [
    "model.preset=test",
    "data.num_train=400",
    "data.num_eval=16",
    "data.tasks=reverse,sort",
    "train.batch_size=8",
    "train.max_steps=24",
    "optim.lr=0.05",
    "optim.warmup_steps=2",
    "eval.every=0",
    "eval.accuracy_samples=4",
    "eval.max_new_tokens=4",
    "log.every=4",
    "log.progress=false",
    "log.plot=false",
    "log.tensorboard=false",
]


def train_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def preset_weights(seed=0):
    """The random init every run here starts from (preset `test`, seed 0)."""
    model = build_model(preset="test", vocab_size=len(load_tokenizer(None)), seed=seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = [
        *TINY,
        f"train.output_dir={out}",
        "train.run_name=lora",
        "peft.method=lora",
        "train.save_every=12",
    ]
    assert main(["train", *args]) == 0
    return out / "lora"


def test_lora_adalomo_saves_the_adapter_and_leaves_the_base_untouched(lora_run):
    for rel in (
        "final/adapter_config.json",
        "final/adapter_model.safetensors",
        "final/tokenizer.json",
        "checkpoints/step-000012/model/adapter_model.safetensors",
        "base/model.safetensors",
        "base/config.json",
    ):
        assert (lora_run / rel).is_file(), rel
    assert not (lora_run / "final" / "model.safetensors").exists()  # the adapter only
    config = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["init_lora_weights"] == "orthogonal"  # auto + adalomo
    # the base written at the first save equals the seeded random init, bitwise
    base, init = load_file(str(lora_run / "base" / "model.safetensors")), preset_weights()
    assert base.keys() <= init.keys() and all(torch.equal(base[k], init[k]) for k in base)
    # and the base inside the trained model is still exactly that
    loaded = load_for_inference(lora_run, device=torch.device("cpu"))
    from peft import get_base_model_state_dict

    inside = get_base_model_state_dict(loaded.model)
    assert all(torch.equal(inside[k], init[k]) for k in base)
    losses = train_losses(lora_run)
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.1


def test_eval_generate_and_merge_the_adapter_run(lora_run, capsys):
    assert main(["eval", str(lora_run), "--accuracy-samples", "4", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "eval loss" in out and "exact match sort" in out
    assert main(["generate", str(lora_run), "sort 4213", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["merge", str(lora_run)]) == 0
    assert "merged" in capsys.readouterr().out
    merged_dir = lora_run / "merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    cpu = torch.device("cpu")
    adapter = load_for_inference(lora_run, device=cpu).model
    merged = load_for_inference(merged_dir, device=cpu).model
    ids = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=0, atol=1e-5
        )
    # the merged model is a plain HF model with the merged weights: it differs from the base
    base = load_file(str(lora_run / "base" / "model.safetensors"))
    weights = load_file(str(merged_dir / "model.safetensors"))
    assert not torch.equal(
        weights["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    # a checkpoint of the run merges too, to another directory
    assert main(["merge", str(lora_run / "checkpoints" / "step-000012"), "--out", str(lora_run / "m12")]) == 0
    assert (lora_run / "m12" / "model.safetensors").is_file()


def test_merge_explains_a_directory_without_adapter(tmp_path, capsys):
    model = build_model(preset="test", vocab_size=len(load_tokenizer(None)))
    model.save_pretrained(tmp_path / "plain")
    assert main(["merge", str(tmp_path / "plain")]) == 2
    assert "has no adapter (adapter_config.json)" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hft_runs(tmp_path_factory):
    """Stage 0 from the preset, stage 1 from stage 0's final model, and stage 0 again (same seed)."""
    out = tmp_path_factory.mktemp("hft")
    common = [*TINY, f"train.output_dir={out}", "train.hft=true", "train.hft_seed=3"]
    stdout = {}
    import contextlib
    import io

    for name, extra in (
        ("s0", []),
        ("s1", [f"model.path={out / 's0' / 'final'}", "train.max_steps=4", "optim.lr=0.01"]),
        ("again", ["train.max_steps=1", "eval.accuracy_samples=0"]),
    ):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["train", *common, f"train.run_name={name}", *extra]) == 0
        stdout[name] = buf.getvalue()
    return out, stdout


def test_hft_freezes_exactly_the_mask_and_reports_the_counted_fraction(hft_runs):
    out, stdout = hft_runs
    final = out / "s0" / "final"
    state = json.loads((final / hft.STATE_FILE).read_text())
    (entry,) = state["history"]
    assert entry["stage"] == 0 and entry["seed"] == 3 and entry["redraw"] == 0
    assert (
        json.loads((out / "s0" / "checkpoints" / "step-000024" / "model" / hft.STATE_FILE).read_text())
        == state
    )
    init, trained = preset_weights(), load_file(str(final / "model.safetensors"))
    frozen = set(entry["frozen_tensors"])
    expected = {f"{b}.{unit}.weight" for b, units in entry["frozen"].items() for unit in units} | {
        "model.embed_tokens.weight"
    }
    assert frozen == expected
    for name, value in trained.items():
        assert torch.equal(value, init[name]) == (name in frozen), name  # frozen: bitwise unchanged
    total = sum(v.numel() for v in trained.values())
    counted = total - sum(trained[n].numel() for n in frozen)
    assert (entry["trainable_parameters"], entry["total_parameters"]) == (counted, total)
    assert entry["trainable_fraction"] == counted / total
    line = re.search(
        r"HFT stage 0 \(seed 3, redraw 0\): ([\d,]+) of ([\d,]+) parameters trainable", stdout["s0"]
    )
    assert line and (int(line[1].replace(",", "")), int(line[2].replace(",", ""))) == (counted, total)
    losses = train_losses(out / "s0")
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.1


def test_hft_stages_redraw_and_the_same_seed_draws_the_same_mask(hft_runs):
    out, _ = hft_runs
    s0 = json.loads((out / "s0" / "final" / hft.STATE_FILE).read_text())["history"]
    s1 = json.loads((out / "s1" / "final" / hft.STATE_FILE).read_text())["history"]
    again = json.loads((out / "again" / "final" / hft.STATE_FILE).read_text())["history"]
    assert len(s1) == 2 and s1[0] == s0[0] and s1[1]["stage"] == 1
    assert s1[1]["frozen"] != s0[0]["frozen"]
    assert again[0]["frozen"] == s0[0]["frozen"]
    # stage 1 kept its own frozen tensors bitwise from where stage 0 left them
    before, after = (
        load_file(str(out / "s0" / "final" / "model.safetensors")),
        load_file(str(out / "s1" / "final" / "model.safetensors")),
    )
    for name in s1[1]["frozen_tensors"]:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize(
    "extra",
    [
        ["train.hft=true", "train.hft_redraw=epoch", "train.accumulation_steps=3"],
        ["train.hft=true", "train.hft_redraw=epoch", "optim.name=adamw", "optim.lr=3e-3"],
        ["peft.method=lora"],
    ],
    ids=["hft-epoch-adalomo-accum", "hft-epoch-adamw", "lora-adalomo"],
)
def test_resume_restores_the_mask_and_adapter_exactly(tmp_path, extra):
    common = [
        *TINY,
        "data.num_train=64",  # 8 batches per epoch: several epochs, so several HFT masks
        "train.max_steps=12",
        "eval.accuracy_samples=0",
        "log.every=1",
        f"train.output_dir={tmp_path}",
        *extra,
    ]
    full = Trainer(load_config(None, [*common, "train.run_name=full"])).run()
    part = Trainer(load_config(None, [*common, "train.run_name=part"]), hooks=[stop_at(6)]).run()
    assert part.interrupted
    summary = Trainer(load_config(None, [*common, "train.run_name=part", "train.resume=auto"])).run()
    name = "adapter_model.safetensors" if "peft.method=lora" in extra else "model.safetensors"
    a, b = load_file(str(full.final_dir / name)), load_file(str(summary.final_dir / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(full.run_dir) == train_losses(summary.run_dir)
    if "train.hft=true" in extra:
        ha = json.loads((full.final_dir / hft.STATE_FILE).read_text())["history"]
        hb = json.loads((summary.final_dir / hft.STATE_FILE).read_text())["history"]
        assert ha == hb and len(ha) >= 2 and len({json.dumps(h["frozen"]) for h in ha}) == len(ha)
