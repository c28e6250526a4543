"""The preference objectives through the trainer: ``train.objective=dpo|ipo|simpo|orpo``.

Oracles: ln 2 at step 1 when the policy is its reference (closed form); the precomputed
reference against the live frozen copy (two independent sources of the same numbers); a batch
of 2B pairs against two accumulated micro-batches of B; an interrupted and resumed run against an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from leantune.checkpoint import CheckpointError
from leantune.cli import main
from leantune.config import ConfigError, load_config
from leantune.trainer import Trainer
from tests.helpers import stop_at


def write_pairs(path, n=48, seed=0, bad=False):
    """Sort-the-digits pairs: chosen sorted, rejected an unsorted permutation. ``bad`` adds an
    empty chosen, an identical pair and an overlong prompt (no completion token left)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [rng.randint(0, 9) for _ in range(4)]
        perm = digits[:]
        while perm == sorted(digits):
            rng.shuffle(perm)
            if len(set(digits)) == 1:
                digits[0] = (digits[0] + 1) % 10
                perm = digits[:]
        show = " ".join
        rows.append({"prompt": "sort " + show(map(str, digits)), "chosen": show(map(str, sorted(digits))),
                     "rejected": show(map(str, perm))})  # fmt: skip
    if bad:
        rows += [
            {"prompt": "sort 3 1", "chosen": "", "rejected": "3 1"},
            {"prompt": "sort 2 1", "chosen": "1 2", "rejected": "1 2"},
            {"prompt": "sort " + "9 " * 200, "chosen": "9", "rejected": "8"},
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(tmp_path, data, name, *extra):
    return [
        "model.preset=test",
        f"data.train={data}",
        "data.num_eval=8",
        "data.max_length=48",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.objective=dpo",
        "train.device=cpu",
        "optim.name=adamw",
        "optim.lr=3e-3",
        "optim.warmup_steps=0",
        "eval.every=0",
        "log.every=1",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        f"train.output_dir={tmp_path}",
        f"train.run_name={name}",
        *extra,
    ]


def losses(run_dir, key="loss"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["kind"] == "train"]


def final(summary):
    return load_file(str(summary.final_dir / "model.safetensors"))


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl")


@pytest.mark.parametrize("optimizer", ["adamw", "adalomo"])
def test_dpo_starts_at_ln2_and_the_precomputed_reference_equals_a_live_copy(tmp_path, pairs, optimizer):
    lr = "optim.lr=3e-3" if optimizer == "adamw" else "optim.lr=0.02"
    pre = Trainer(load_config(None, args(tmp_path, pairs, "pre", f"optim.name={optimizer}", lr))).run()
    live = Trainer(load_config(None, args(tmp_path, pairs, "live", f"optim.name={optimizer}", lr,
                                          "dpo.reference=live"))).run()  # fmt: skip
    a, b = losses(pre.run_dir), losses(live.run_dir)
    assert a[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: -log sigmoid(0)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert a[-1] < a[0]  # it learns
    assert (pre.run_dir / "reference" / "manifest.json").is_file()
    assert not (live.run_dir / "reference").exists()
    margins = losses(pre.run_dir, "rewards/margins")
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > 0
    assert 0 <= pre.metrics["eval_reward_accuracy"] <= 1
    assert pre.metrics["eval_pairs"] == 4  # at most a tenth of the 48 pairs is held out


def test_accumulating_two_micro_batches_equals_one_batch_of_twice_the_size(tmp_path, pairs):
    # 5 steps: inside the first epoch of 44 training pairs for both (an epoch ends on a whole batch)
    steps = "train.max_steps=5"
    one = Trainer(load_config(None, args(tmp_path, pairs, "one", "train.batch_size=8", steps))).run()
    two = Trainer(load_config(None, args(tmp_path, pairs, "two", "train.batch_size=4", steps,
                                         "train.accumulation_steps=2"))).run()  # fmt: skip
    assert losses(one.run_dir) == pytest.approx(losses(two.run_dir), rel=1e-5)
    a, b = final(one), final(two)
    for k in a:
        # Adam divides by sqrt(v): a near-zero gradient's rounding moves its element by up to ~1% of
        # one step (lr 3e-3); a wrong accumulation moves every element by whole steps
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_an_interrupted_preference_run_resumes_bitwise(tmp_path, pairs, objective):
    extra = [f"train.objective={objective}", "optim.name=adalomo", "optim.lr=0.02"]
    full = Trainer(load_config(None, args(tmp_path, pairs, "full", *extra))).run()
    part = Trainer(load_config(None, args(tmp_path, pairs, "part", *extra)), hooks=[stop_at(3)]).run()
    assert part.interrupted and part.steps == 3
    resumed = Trainer(load_config(None, args(tmp_path, pairs, "part", *extra, "train.resume=auto"))).run()
    assert resumed.steps == 6 and resumed.metrics["steps_this_run"] == 3
    a, b = final(full), final(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full.run_dir) == losses(resumed.run_dir)


def test_a_resumed_run_refuses_a_missing_or_foreign_reference(tmp_path, pairs):
    part = Trainer(load_config(None, args(tmp_path, pairs, "r")), hooks=[stop_at(2)]).run()
    ref = part.run_dir / "reference"
    manifest = json.loads((ref / "manifest.json").read_text())
    manifest["meta"]["pairs"] = "0" * 64
    (ref / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="belong to other data"):
        Trainer(load_config(None, args(tmp_path, pairs, "r", "train.resume=auto"))).run()
    import shutil

    shutil.rmtree(ref)
    with pytest.raises(CheckpointError, match="reference log-probs of the initial model.*missing"):
        Trainer(load_config(None, args(tmp_path, pairs, "r", "train.resume=auto"))).run()


@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo"])
def test_every_preference_loss_trains_and_logs_its_rewards(tmp_path, pairs, objective):
    s = Trainer(load_config(None, args(tmp_path, pairs, objective, f"train.objective={objective}"))).run()
    rows = [json.loads(x) for x in (s.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"} <= set(train[0])
    assert all(math.isfinite(r["loss"]) for r in train)
    assert (s.run_dir / "reference").exists() == (objective == "ipo")


def test_lora_uses_the_disabled_adapter_as_its_reference(tmp_path, pairs):
    s = Trainer(load_config(None, args(tmp_path, pairs, "lora", "peft.method=lora", "optim.lr=1e-2"))).run()
    got = losses(s.run_dir)
    assert got[0] == pytest.approx(math.log(2), abs=1e-6) and got[-1] < got[0]
    assert not (s.run_dir / "reference").exists()
    assert (s.final_dir / "adapter_config.json").is_file()


def test_hft_trains_with_a_preference_loss(tmp_path, pairs):
    s = Trainer(load_config(None, args(tmp_path, pairs, "hft", "train.hft=true", "optim.name=adalomo",
                                       "optim.lr=0.02"))).run()  # fmt: skip
    assert losses(s.run_dir)[0] == pytest.approx(math.log(2), abs=1e-6)


def test_bad_pairs_are_counted_and_reported(tmp_path, capsys):
    data = write_pairs(tmp_path / "bad.jsonl", bad=True)
    assert main(["train", *args(tmp_path, data, "bad", "train.max_steps=1", "data.num_eval=0")]) == 0
    out = capsys.readouterr().out
    assert "dropped 3 of 51 pairs" in out
    assert "1 with an empty chosen or rejected completion" in out
    assert "1 with identical chosen and rejected completions" in out
    assert "1 with no completion token left after data.max_length" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.train=builtin"], r"trains on preference pairs: set data.train"),
        (["dpo.reference=adapter"], r"dpo.reference=adapter needs a peft run"),
        (["train.objective=dpoo"], r"train.objective must be one of .*did you mean 'dpo'"),
        (["dpo.beta=0"], r"dpo.beta must be > 0"),
        (["dpo.label_smoothing=0.5"], r"dpo.label_smoothing must be in \[0, 0.5\)"),
        (["data.pack=true"], r"unpacked"),
        (["train.objective=sft", "data.format=preference"], r"train.objective=sft does not read"),
    ],
)
def test_bad_preference_settings_are_config_errors(tmp_path, pairs, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, args(tmp_path, pairs, "x", *extra))


def test_sft_data_under_a_preference_objective_is_refused(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(40)))
    assert main(["train", *args(tmp_path, text, "sft")]) == 2


def test_eval_task_preference_rebuilds_the_reference_and_agrees_with_the_run(tmp_path, pairs, capsys):
    """The CLI's reference is the preset's init rebuilt from the run's seed; the run's own final
    evaluation used the precomputed table: the same held-out accuracy from two sources."""
    s = Trainer(load_config(None, args(tmp_path, pairs, "ev", "train.max_steps=8"))).run()
    capsys.readouterr()
    assert main(["eval", str(s.run_dir), "--task", "preference", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"implicit-reward accuracy (dpo)  {s.metrics['eval_reward_accuracy']:.1%}" in out
    assert f"mean reward margin (dpo)        {s.metrics['eval_rewards/margins']:.4f}" in out
    assert "(4 pairs)" in out and "reference: the initial test model (seed 0)" in out
    simpo = ["--data", str(pairs), "--objective", "simpo"]
    assert main(["eval", str(s.run_dir), "--task", "preference", *simpo]) == 0
    out = capsys.readouterr().out
    assert "(48 pairs)" in out and "reference: none" in out and "win rate of the chosen completion" in out
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    assert main(["eval", str(s.run_dir), "--task", "preference", "--data", str(text)]) == 2
    assert "prompt/chosen/rejected" in capsys.readouterr().err


def test_dpo_in_bf16_with_stochastic_rounding_and_clipping_learns(tmp_path, pairs):
    extra = ["model.dtype=bf16", "optim.name=adalomo", "optim.lr=0.02", "optim.clip_grad_norm=1.0",
             "train.max_steps=8"]  # fmt: skip
    s = Trainer(load_config(None, args(tmp_path, pairs, "bf16", *extra))).run()
    got = losses(s.run_dir)
    assert got[0] == pytest.approx(math.log(2), abs=1e-6)  # the reference is this same bf16 model
    assert all(math.isfinite(x) for x in got) and got[-1] < got[0]
    rows = [json.loads(x) for x in (s.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("grad_norm" in r for r in rows if r["kind"] == "train")  # clipping measured every step
