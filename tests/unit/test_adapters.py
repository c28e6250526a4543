"""peft adapters: config translation, training with the fused optimizers (only adapters move),
saving, loading (also after the run moved), merging, and the config checks."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch

from leantune import adapters
from leantune.config import ConfigError, PeftConfig, load_config
from leantune.data import load_tokenizer
from leantune.evaluate import eval_loss
from leantune.optim import AdaLomo, build_optimizer
from tests.helpers import batch, loss_of, tiny_llama


@pytest.mark.parametrize(
    ("cfg", "cls", "fields"),
    [
        (
            PeftConfig(method="lora", r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
            peft.LoraConfig,
            {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": {"q_proj", "v_proj"}},
        ),
        (
            PeftConfig(method="lora", use_dora=True),
            peft.LoraConfig,
            {"use_dora": True, "target_modules": "all-linear"},
        ),
        (PeftConfig(method="lora", use_rslora=True), peft.LoraConfig, {"use_rslora": True}),
        (PeftConfig(method="ia3"), peft.IA3Config, {"feedforward_modules": {"down_proj"}}),
        (
            PeftConfig(method="prefix", num_virtual_tokens=5),
            peft.PrefixTuningConfig,
            {"num_virtual_tokens": 5},
        ),
        (
            PeftConfig(method="prompt", num_virtual_tokens=3),
            peft.PromptTuningConfig,
            {"num_virtual_tokens": 3},
        ),
    ],
    ids=["lora", "dora", "rslora", "ia3", "prefix", "prompt"],
)
def test_build_peft_config(cfg, cls, fields):
    out = adapters.build_peft_config(cfg, tiny_llama())
    assert type(out) is cls and out.task_type == peft.TaskType.CAUSAL_LM
    for key, value in fields.items():
        assert getattr(out, key) == value, key


@pytest.mark.parametrize(
    ("init", "r", "optimizer", "expected"),
    [
        ("auto", 8, "adalomo", "orthogonal"),
        ("auto", 8, "adafactor_in_backward", "orthogonal"),
        ("auto", 7, "adalomo", True),
        ("auto", 8, "adamw", True),
        ("default", 8, "adalomo", True),
        ("gaussian", 8, "adamw", "gaussian"),
    ],
)
def test_lora_init(init, r, optimizer, expected):
    assert adapters.lora_init(PeftConfig(method="lora", r=r, init=init), optimizer) == expected


def _base_weights(model):
    return {k: v.clone() for k, v in peft.get_base_model_state_dict(model).items()}


@pytest.mark.parametrize(
    ("cfg", "extra"),
    [
        (PeftConfig(method="lora", r=4), {}),
        (PeftConfig(method="lora", r=4), {"accumulation_steps": 2}),
        (PeftConfig(method="lora", r=4, use_dora=True), {}),
        (PeftConfig(method="lora", r=4, use_rslora=True), {"clip_grad_norm": 1.0}),
        (PeftConfig(method="ia3"), {}),
        (PeftConfig(method="prefix", num_virtual_tokens=4), {}),
        (PeftConfig(method="prompt", num_virtual_tokens=4), {}),
    ],
    ids=["lora", "lora-accum", "dora", "rslora-clip", "ia3", "prefix", "prompt"],
)
def test_adalomo_trains_only_the_adapter(cfg, extra):
    torch.manual_seed(0)
    model = adapters.wrap_model(tiny_llama(), cfg, optimizer="adalomo")
    base = _base_weights(model)
    opt = AdaLomo(model, lr=0.05, **extra)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in opt.trainable_parameters()} == trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.5 * sum(
        v.numel() for v in base.values()
    )
    b = {**batch(), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    first = loss_of(model, b).item()
    for _ in range(8 * extra.get("accumulation_steps", 1)):
        opt.backward(loss_of(model, b))
    assert loss_of(model, b).item() < first - 1e-3
    assert all(torch.equal(base[k], v) for k, v in peft.get_base_model_state_dict(model).items())
    assert set(opt.state) and all(id(p) in trainable for p in opt.state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_with_activation_checkpointing(dtype):
    model = tiny_llama(dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = adapters.wrap_model(model, PeftConfig(method="lora", r=4), optimizer="adalomo")
    base = _base_weights(model)
    opt = build_optimizer("adalomo", model, lr=0.05, rounding="stochastic")
    model.train()
    b = batch()
    first = loss_of(model, b).item()
    for _ in range(8):
        opt.backward(loss_of(model, b))
    assert loss_of(model, b).item() < first
    assert all(torch.equal(base[k], v) for k, v in peft.get_base_model_state_dict(model).items())


def test_prefix_tuning_refuses_activation_checkpointing():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(adapters.AdapterError, match="gradient checkpointing"):
        adapters.wrap_model(model, PeftConfig(method="prefix"))


def test_target_modules_that_match_nothing_are_a_clear_error():
    with pytest.raises(adapters.AdapterError, match="peft.method=lora:.*nope"):
        adapters.wrap_model(tiny_llama(), PeftConfig(method="lora", target_modules=["nope"]))


def test_eval_loss_aligns_prompt_tuning_logits():
    from leantune.data.encode import Sample

    model = adapters.wrap_model(tiny_llama(), PeftConfig(method="prompt", num_virtual_tokens=3))
    ids = batch(size=1)["input_ids"][0].tolist()
    labels = [-100] * 4 + ids[4:]
    sample = Sample(input_ids=ids, labels=labels)
    got = eval_loss(model, [sample], batch_size=1, pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        model.eval()
        ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert got["eval_loss"] == pytest.approx(ref, rel=1e-5)


@pytest.fixture
def saved_adapter(tmp_path):
    """A trained-looking LoRA adapter saved as a preset run would: RUN/base + RUN/final."""
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = adapters.wrap_model(tiny_llama(), PeftConfig(method="lora", r=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    run = tmp_path / "run"
    adapters.save_base(model, run / "base", tok)
    adapters.save_adapter(model, run / "final", base=run / "base")
    tok.save_pretrained(run / "final")
    model.eval()
    return run, model


def test_saved_adapter_reloads_and_merges_to_the_same_logits(saved_adapter, tmp_path):
    run, model = saved_adapter
    config = json.loads((run / "final" / adapters.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str((run / "base").resolve())
    b = batch()
    with torch.no_grad():
        ref = model(**b).logits
        loaded = adapters.load_adapter_model(run / "final")
        assert torch.equal(loaded(**b).logits, ref)
        out = adapters.merge_adapter(run / "final", tmp_path / "merged")
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(out)
        assert not any("lora" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(**b).logits, ref, rtol=0, atol=1e-5)
    assert (out / "manifest.json").is_file() and (out / "tokenizer.json").is_file()


def test_a_moved_run_still_finds_its_base(saved_adapter, tmp_path):
    run, model = saved_adapter
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    assert adapters.resolve_base(moved / "final") == (moved / "base").resolve()
    shutil.rmtree(moved / "base")
    with pytest.raises(adapters.AdapterError, match="base model of this adapter was not found"):
        adapters.load_adapter_model(moved / "final")


def test_merge_refuses_what_it_cannot_merge(tmp_path):
    with pytest.raises(adapters.AdapterError, match="not a peft adapter"):
        adapters.merge_adapter(tmp_path, tmp_path / "out")
    tok = load_tokenizer(None)
    model = adapters.wrap_model(tiny_llama(), PeftConfig(method="prompt", num_virtual_tokens=2))
    adapters.save_base(model, tmp_path / "base", tok)
    adapters.save_adapter(model, tmp_path / "final", base=tmp_path / "base")
    with pytest.raises(adapters.AdapterError, match="prompt_tuning adapter: .*nothing to merge"):
        adapters.merge_adapter(tmp_path / "final", tmp_path / "out")


def test_resume_helpers_restore_adapter_and_base(saved_adapter):
    run, model = saved_adapter
    fresh = adapters.wrap_model(tiny_llama(seed=5), PeftConfig(method="lora", r=4))
    adapters.load_base_weights(fresh, run / "base")
    adapters.load_adapter_weights(fresh, run / "final")
    fresh.eval()
    b = batch()
    with torch.no_grad():
        assert torch.equal(fresh(**b).logits, model(**b).logits)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.hft=true", "peft.method=lora"], "exclude each other"),
        (
            ["peft.method=prefix", "model.gradient_checkpointing=true"],
            "prefix does not work with model.gradient_checkpointing",
        ),
        (["train.hft_redraw=step"], "train.hft_redraw must be stage or epoch"),
        (["peft.method=ia3", "peft.use_dora=true"], "apply to peft.method=lora, not 'ia3'"),
        (["peft.method=lora", "peft.init=orthogonal", "peft.r=5"], "needs an even peft.r, got 5"),
        (["peft.init=kaiming"], "peft.init must be auto, default, gaussian or orthogonal"),
        (["peft.r=0"], "peft.r must be >= 1"),
        (["peft.dropout=1"], r"peft.dropout must be in \[0, 1\)"),
        (["peft.method=loraa"], "peft.method must be none, lora"),
        (["peft.method=prompt", "dist.strategy=fsdp"], "prompt does not work with dist.strategy=fsdp"),
        (["peft.method=prefix", "dist.strategy=fsdp"], r"Use dist.strategy=ddp, or peft.method=lora\|ia3"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
