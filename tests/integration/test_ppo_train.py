"""PPO through the loop and the CLI: ``train.objective=ppo``.

Oracles: an uninterrupted run against one stopped and resumed (bitwise); macro actions of one
token against token-level PPO (bitwise, the whole run); a reward model's scores against
transformers' own pooled logits; the built-in reward against the task generator's answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leantune import checkpoint as ckpt
from leantune.cli import main
from leantune.config import ConfigError, load_config
from leantune.rl.loop import PPOHook, PPOTrainer

REWARDS = Path(__file__).resolve().parents[1] / "fixtures" / "rl_rewards.py"


def overrides(tmp_path, name, *extra):
    return [
        "model.preset=test",
        "train.objective=ppo",
        "data.tasks=[reverse]",
        "data.num_train=64",
        "data.num_eval=8",
        "train.batch_size=4",
        "train.max_steps=4",
        "rl.max_new_tokens=6",
        "rl.ppo_epochs=2",
        "rl.minibatch_size=2",
        "optim.warmup_steps=0",
        f"rl.reward={REWARDS}:odd_chars",
        "eval.every=0",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        "train.device=cpu",
        f"train.output_dir={tmp_path}",
        f"train.run_name={name}",
        *extra,
    ]


def run(tmp_path, name, *extra, hooks=()):
    return PPOTrainer(load_config(None, overrides(tmp_path, name, *extra)), hooks=hooks).run()


class StopAt(PPOHook):
    def __init__(self, step):
        self.step = step

    def on_iteration_end(self, trainer, step, metrics):
        if step == self.step:
            trainer.request_stop()


def weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


def train_records(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ppo_learns_the_signal_and_logs_its_metrics(tmp_path):
    s = run(tmp_path, "a", "train.max_steps=6", "optim.lr=0.05", "eval.every=3", "log.every=1")
    assert s.steps == 6 and (s.final_dir / "model.safetensors").is_file()
    rec = train_records(s.run_dir)
    for key in ("reward", "kl", "entropy", "response_len", "value_loss", "pg_loss", "clipfrac",
                "vf_clipfrac", "approx_kl", "macro_len", "lr", "peak_mem_bytes"):  # fmt: skip
        assert key in rec[6], key
    assert rec[1]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its reference at first
    assert rec[6]["kl"] != 0.0  # and moved away from it
    assert rec[1]["macro_len"] == 1.0
    assert "eval_reward" in s.metrics and 0.0 <= s.metrics["eval_reward"] <= 1.0
    assert (s.run_dir / "tb").exists() is False  # log.tensorboard=false honoured
    from leantune.plot import plot_run

    assert plot_run(s.run_dir).stat().st_size > 0  # the reward / KL panel


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path):
    full = run(tmp_path, "full", "train.save_every=2")
    first = load_file(str(full.run_dir / "checkpoints/step-000002/model/model.safetensors"))
    assert not torch.equal(first["lm_head.weight"], weights(full.final_dir)["lm_head.weight"])  # it trains
    part = run(tmp_path, "part", "train.save_every=2", hooks=[StopAt(2)])
    assert part.interrupted and part.steps == 2
    resumed = run(tmp_path, "part", "train.save_every=2", "train.resume=auto")
    assert resumed.steps == 4
    assert_same_weights(weights(full.final_dir), weights(resumed.final_dir))
    last = "checkpoints/step-000004"
    assert_same_weights(load_file(str(full.run_dir / last / "critic/model.safetensors")),
                        load_file(str(resumed.run_dir / last / "critic/model.safetensors")))  # fmt: skip
    a, b = train_records(full.run_dir), train_records(resumed.run_dir)
    for step in (3, 4):  # the same rollouts (sampling seeded) and the same losses
        for key in ("reward", "kl", "pg_loss", "value_loss", "response_len"):
            assert a[step][key] == b[step][key], (step, key)


def test_shared_value_head_resumes_exactly_too(tmp_path):
    extra = ("rl.critic=shared", "rl.macro_action=ngram", "rl.ngram=2", "train.save_every=2")
    full = run(tmp_path, "full", *extra)
    run(tmp_path, "part", *extra, hooks=[StopAt(2)])
    resumed = run(tmp_path, "part", *extra, "train.resume=auto")
    assert_same_weights(weights(full.final_dir), weights(resumed.final_dir))
    head = "checkpoints/step-000004/value_head.safetensors"
    assert_same_weights(load_file(str(full.run_dir / head)), load_file(str(resumed.run_dir / head)))
    assert train_records(full.run_dir)[4]["macro_len"] > 1.0


def test_one_token_macro_actions_are_token_level_ppo(tmp_path):
    token = run(tmp_path, "token", "rl.macro_action=none")
    macro = run(tmp_path, "macro", "rl.macro_action=ngram", "rl.ngram=1")
    assert_same_weights(weights(token.final_dir), weights(macro.final_dir))
    three = run(tmp_path, "three", "rl.macro_action=ngram", "rl.ngram=3")
    assert not torch.equal(
        weights(token.final_dir)["lm_head.weight"], weights(three.final_dir)["lm_head.weight"]
    )


@pytest.mark.parametrize("extra", [
    ("rl.macro_action=random", "rl.macro_value=position", "optim.name=adamw", "optim.lr=1e-3"),
    ("rl.macro_action=ppl", "rl.macro_value=last", "rl.reference=offload", "rl.reward_norm=scale"),
    ("rl.entropy_coef=0.01", "rl.ptx_coef=0.5", "rl.reward_norm=none", "rl.reward_clip=null",
     "rl.advantage_clip=null", "rl.clip_ratio=null", "rl.value_clip=null", "rl.whiten_advantages=false"),
    ("rl.critic=test", "rl.critic_lr=0.01", f"rl.reward={REWARDS}:with_answers"),
])  # fmt: skip
def test_ppo_variants_run(tmp_path, extra):
    s = run(tmp_path, "v", "train.max_steps=2", *extra)
    rec = train_records(s.run_dir)
    assert s.steps == 2 and all(
        torch.isfinite(torch.tensor(float(rec[2][k]))) for k in ("pg_loss", "value_loss")
    )
    if "rl.ptx_coef=0.5" in extra:
        assert rec[2]["ptx_loss"] > 0


def test_reward_model_scores_and_initialises_the_critic(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from leantune.data import load_tokenizer
    from leantune.models import preset_config
    from leantune.rl.values import last_token_values

    tok = load_tokenizer(None)
    config = LlamaConfig(**{**preset_config("test", vocab_size=len(tok)).to_dict(), "num_labels": 1,
                            "pad_token_id": tok.pad_token_id})  # fmt: skip
    torch.manual_seed(3)
    rm = LlamaForSequenceClassification(config).eval()
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)  # no tokenizer saved: the policy's token ids are scored as they are
    sequences = [[1, 40, 41, 42], [1, 50, 51], [1, 60]]
    width = max(map(len, sequences))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in sequences])
    mask = (torch.arange(width) < torch.tensor([len(s) for s in sequences]).unsqueeze(1)).long()
    with torch.no_grad():
        oracle = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # transformers' own pooling
    got = last_token_values(rm, sequences, torch.device("cpu"))
    torch.testing.assert_close(torch.tensor(got), oracle, rtol=1e-5, atol=1e-6)

    trainer = PPOTrainer(
        load_config(None, overrides(tmp_path, "rm", f"rl.reward={rm_dir}", "train.max_steps=1"))
    )
    trainer.setup()
    try:
        assert "reward model" in trainer.critic_note
        critic_state = trainer.critic.model.state_dict()
        for k, v in rm.state_dict().items():
            assert torch.equal(critic_state[k], v), k  # PPO-max: the critic starts as the reward model
        summary = trainer.train()
        assert summary.steps == 1
    finally:
        trainer.close()


def test_builtin_reward_against_the_task_generator():
    from leantune.data.tasks import TASKS, make_example
    from leantune.rl.rewards import builtin_tasks, positional_match

    rng = random.Random(0)
    for task in TASKS:
        for _ in range(20):
            ex = make_example(task, rng)
            prompt = ex["prompt"]
            assert builtin_tasks([prompt], [ex["response"]]) == [1.0], (task, ex)
            wrong = ex["response"][:-1] + ("x" if ex["response"][-1] != "x" else "y")
            assert builtin_tasks([prompt], [wrong])[0] < 1.0
    assert positional_match("abcd", "abXd") == 0.75
    assert positional_match("abcd", "abcdef") == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="not a built-in task prompt"):
        builtin_tasks(["translate this"], ["x"])


@pytest.mark.parametrize(("name", "message"), [
    ("fails_on_third", "raised ValueError: the reward server is down"),
    ("nan_on_third", "returned a non-finite score (nan) for completion 1"),
    ("short_on_third", "returned 3 scores for 4 completions"),
])  # fmt: skip
def test_a_bad_reward_stops_the_run_with_its_last_checkpoint_intact(
    tmp_path, monkeypatch, capsys, name, message
):
    monkeypatch.setenv("LEANTUNE_TEST_REWARD_COUNTER", str(tmp_path / "calls"))
    args = overrides(tmp_path, "bad", f"rl.reward={REWARDS}:{name}", "train.save_every=2")
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert f"rl.reward='{REWARDS}:{name}'" in err and message in err
    assert "iteration 3" in err and "train.resume=auto" in err
    kept = ckpt.latest_valid_checkpoint(tmp_path / "bad" / "checkpoints")
    assert kept is not None and kept.name == "step-000002"
    ckpt.verify_checkpoint(kept)  # checksums too
    assert not (tmp_path / "bad" / "final").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (("rl.minibatch_size=8",), "rl.minibatch_size (8) is larger than the rollout"),
    (("dist.strategy=ddp", "dist.nproc=2"), "runs in one process"),
    (("peft.method=lora",), "trains the full policy"),
    (("train.accumulation_steps=2",), "set rl.minibatch_size instead"),
    (("rl.macro_action=parse",), "rl.macro_action must be one of none, ngram, random, ppl"),
    (("rl.reward=no_such_thing",), "neither module:function nor a reward model directory"),
    (("rl.temperature=0",), "rl.temperature must be > 0"),
    (("rl.clip_ratio=-1",), "rl.clip_ratio must be > 0 or null"),
])  # fmt: skip
def test_bad_rl_settings_are_refused(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides(tmp_path, "x", *extra))


def test_reward_that_cannot_be_imported_is_named_by_the_cli(tmp_path, capsys):
    assert main(["train", *overrides(tmp_path, "x", "rl.reward=leantune_no_such_module:score")]) == 2
    err = capsys.readouterr().err
    assert "importing leantune_no_such_module failed" in err
    assert main(["train", *overrides(tmp_path, "y", f"rl.reward={REWARDS}:no_such_function")]) == 2
    assert "has no function 'no_such_function'" in capsys.readouterr().err


def test_prompts_without_a_prompt_are_refused(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"plain text {i}"}) + "\n" for i in range(20)))
    with pytest.raises(ConfigError, match="without a prompt"):
        run(tmp_path, "t", f"data.train={text}")
