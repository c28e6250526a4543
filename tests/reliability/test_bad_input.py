"""Bad input: every case fails with exit code 2, a message that says what, where and how to fix it,
and nothing written (no run directory, or an existing run left untouched)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from leantune.cli import main
from tests.reliability.common import TINY

GOOD = [{"prompt": f"sort {i:03d}", "response": "".join(sorted(f"{i:03d}"))} for i in range(40)]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data_case(rows):
    """Arguments for a training file with ``rows`` (dicts, or raw lines as strings)."""
    return lambda tmp: [f"data.train={jsonl(tmp / 'train.jsonl', rows)}"]


def bin_only_model(tmp):
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")
    (tmp / "model" / "pytorch_model.bin").write_bytes(b"not read")
    return [f"model.path={tmp / 'model'}"]


CASES = {
    # data
    "malformed json line": (
        data_case([*GOOD[:2], '{"prompt": "a", "response": }', *GOOD[2:]]),
        r"train\.jsonl:3: malformed JSON \(Expecting value at column 29\); each line must be one JSON object",
    ),
    "not an object": (data_case([*GOOD[:5], "[1, 2]"]), r"train\.jsonl:6: expected a JSON object per line"),
    "missing field": (
        data_case([GOOD[0], {"prompt": "x"}, *GOOD[1:]]),
        r"train\.jsonl:2: missing field 'response' "
        r"\(format instruction needs prompt, response; found prompt\)",
    ),
    "wrong field type": (
        data_case([*GOOD[:3], {"prompt": "x", "response": 5}]),
        r"train\.jsonl:4: field 'response' must be a string, got int",
    ),
    "unknown format": (data_case([{"question": "x"}]), r"cannot tell the data format .*or set data\.format"),
    "empty dataset": (data_case([]), r"train\.jsonl: the file has no records \(it is empty\)"),
    "every label masked": (
        data_case([{"prompt": "p" * 80, "response": "r"} for _ in range(40)]),
        r"no usable samples out of 36: 36 had every label masked .*Raise data\.max_length",
    ),
    "everything too long (drop)": (
        lambda tmp: [*data_case([{"prompt": "p", "response": "r" * 80}] * 40)(tmp), "data.overlong=drop"],
        r"no usable samples out of 36: 36 were longer than data\.max_length=64",
    ),
    "too little data for a batch": (
        lambda tmp: [*data_case(GOOD[:3])(tmp), "data.num_eval=0"],
        r"3 training samples cannot fill one batch of 4 .*lower train\.batch_size or add data",
    ),
    "data file missing": (
        lambda tmp: ["data.train=/no/such/train.jsonl"],
        r"'/no/such/train\.jsonl' does not exist",
    ),
    "unsupported data file": (
        lambda tmp: [f"data.train={jsonl(tmp / 'train.csv', ['a,b'])}"],
        r"unsupported file type '\.csv'; use \.jsonl, \.json or \.parquet",
    ),
    # model and tokenizer paths
    "model path missing": (
        lambda tmp: ["model.path=/no/such/model"],
        r"model\.path '/no/such/model' does not exist: give a local Hugging Face model directory",
    ),
    "model without safetensors": (
        bin_only_model,
        r"has no \*\.safetensors weights \(found pytorch_model\.bin\)",
    ),
    "tokenizer path missing": (
        lambda tmp: ["model.tokenizer=/no/such/tok"],
        r"model\.tokenizer '/no/such/tok' does not exist",
    ),
    "tokenizer directory without a tokenizer": (
        lambda tmp: (tmp / "tok").mkdir() or [f"model.tokenizer={tmp / 'tok'}"],
        r"no usable tokenizer in .*tok.*tokenizer_config\.json\); or set model\.tokenizer",
    ),
    # configuration
    "misspelt key": (
        lambda tmp: ["optim.lrr=0.1"],
        r"Unknown config key 'optim\.lrr'\. Did you mean 'optim\.lr'\?",
    ),
    "misspelt section": (lambda tmp: ["optm.lr=0.1"], r"Did you mean 'optim\.lr'\?"),
    "misspelt optimizer": (
        lambda tmp: ["optim.name=adamww"],
        r"Unknown optimizer 'adamww'\. Did you mean 'adamw'\?",
    ),
    "misspelt preset": (
        lambda tmp: ["model.preset=tset"],
        r"model\.preset must be one of .*did you mean 'test'\?",
    ),
    "wrong type": (lambda tmp: ["train.max_steps=ten"], r"train\.max_steps: expected an integer, got 'ten'"),
    "out of range": (
        lambda tmp: ["train.accumulation_steps=0"],
        r"train\.accumulation_steps must be >= 1, got 0",
    ),
    "not key=value": (lambda tmp: ["train.max_steps"], None),  # read as a YAML file name
    # incompatible options
    "fp16 without loss scaling": (
        lambda tmp: ["model.dtype=fp16"],
        r"model\.dtype=fp16 needs loss scaling.*set optim\.loss_scale=dynamic",
    ),
    "rounding a non-fused optimizer ignores": (
        lambda tmp: ["optim.name=adamw", "optim.rounding=stochastic"],
        r"optim\.rounding=stochastic applies to optimizers fused into backward.*adamw_in_backward",
    ),
    "engine option inside optim.kwargs": (
        lambda tmp: ["optim.kwargs={clip_grad_norm: 1.0}"],
        r"optim\.kwargs\.clip_grad_norm is a setting of its own: use optim\.clip_grad_norm=1\.0 instead",
    ),
    "sophia under ddp": (
        lambda tmp: ["optim.name=sophia", "dist.strategy=ddp"],
        r"optim\.name=sophia .*torch\.autograd\.grad.*dist\.strategy=ddp does not keep",
    ),
    "fsdp option without fsdp": (
        lambda tmp: ["dist.cpu_offload=true"],
        r"dist\.cpu_offload applies to dist\.strategy=fsdp only",
    ),
    "hft with peft": (lambda tmp: ["train.hft=true", "peft.method=lora"], r"exclude each other"),
    "prefix tuning with checkpointing": (
        lambda tmp: ["peft.method=prefix", "model.gradient_checkpointing=true"],
        r"peft\.method=prefix does not work with model\.gradient_checkpointing",
    ),
    "resume from nothing": (
        lambda tmp: [f"train.resume={tmp / 'nope'}"],
        r"train\.resume: .*nope is not a directory",
    ),
    # devices: refused by the config, before any model, data or worker (also under dist.nproc)
    "not a device": (lambda tmp: ["train.device=banana"], r"train\.device='banana' is not a device"),
    "a device leantune does not train on": (
        lambda tmp: ["train.device=mps"],
        r"train\.device=mps: leantune trains on cpu or cuda",
    ),
    "factored optimizer in backward under fsdp": (
        lambda tmp: ["optim.name=adafactor_in_backward", "dist.strategy=fsdp"],
        r"optim\.name=adafactor_in_backward under dist\.strategy=fsdp would compute its statistics on one "
        r"shard .*adamw_in_backward",
    ),
}
if not torch.cuda.is_available():
    CASES |= {
        "cuda without CUDA": (
            lambda tmp: ["train.device=cuda"],
            r"train\.device=cuda but CUDA is not available here; use train\.device=cpu",
        ),
        "cuda without CUDA, before torchrun starts": (
            lambda tmp: ["train.device=cuda", "dist.strategy=fsdp", "dist.nproc=2"],
            r"train\.device=cuda but CUDA is not available here",
        ),
        "cpu offload on the CPU, before torchrun starts": (
            lambda tmp: ["dist.strategy=fsdp", "dist.cpu_offload=true", "dist.nproc=2"],
            r"dist\.cpu_offload=true needs CUDA .*set dist\.cpu_offload=false",
        ),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, capsys):
    make, message = CASES[case]
    out = tmp_path / "runs"
    args = [*TINY, "train.max_steps=2", f"train.output_dir={out}", *make(tmp_path)]
    if case == "not key=value":
        args = ["train.max_steps", *args]
        message = r"config file 'train\.max_steps' does not exist"
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resuming_with_a_different_config_explains_the_difference_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    common = [*TINY, "train.max_steps=3", "train.save_every=2", f"train.output_dir={out}", "train.run_name=r"]
    common.append("optim.lr=0.05")
    assert main(["train", *common]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    changed = ["optim.lr=0.01", "train.accumulation_steps=2", "data.tasks=sort"]
    assert main(["train", *common, "train.resume=auto", "train.max_steps=6", *changed]) == 2
    err = capsys.readouterr().err
    for line in (
        r"cannot resume .*/r: its config differs in settings that change the training itself:",
        r"  data\.tasks: run has \['reverse', 'sort'\], now \['sort'\]",
        r"  optim\.lr: run has 0\.05, now 0\.01",
        r"  train\.accumulation_steps: run has 1, now 2",
        r"Use the run's own settings \(see .*config\.yaml\) or start a new run\.",
    ):
        assert re.search(line, err), err
    assert "max_steps" not in err  # allowed to change
    assert _snapshot(out) == before
    # and a new run in the same directory is refused rather than mixed in
    assert main(["train", *common]) == 2
    assert "already holds checkpoints: resume it with train.resume=auto" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("policy", "counted"),
    [("truncate", r"4 truncated to max_length"), ("drop", r"4 dropped as longer than max_length")],
)
def test_overlong_samples_are_truncated_or_dropped_and_counted(policy, counted, tmp_path, capsys):
    rows = [*GOOD[:36], *[{"prompt": "q", "response": "r" * 80}] * 4]
    # the eval split is held out first: give a separate eval file so that all 4 long ones train
    args = [
        *TINY,
        "train.max_steps=1",
        f"data.train={jsonl(tmp_path / 'train.jsonl', rows)}",
        f"data.eval={jsonl(tmp_path / 'eval.jsonl', GOOD[:8])}",
        f"data.overlong={policy}",
        f"train.output_dir={tmp_path / 'runs'}",
    ]
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert re.search(
        rf"data \(instruction\): train 40 records -> {40 if policy == 'truncate' else 36} sequences", out
    )
    assert re.search(counted, out), out


def test_masked_samples_are_dropped_and_counted(tmp_path, capsys):
    rows = [*GOOD[:36], *[{"prompt": "p" * 80, "response": "r"}] * 3]
    args = [
        *TINY,
        "train.max_steps=1",
        f"data.train={jsonl(tmp_path / 'train.jsonl', rows)}",
        f"data.eval={jsonl(tmp_path / 'eval.jsonl', GOOD[:8])}",
        f"train.output_dir={tmp_path / 'runs'}",
    ]
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "39 records -> 36 sequences" in out and "3 truncated to max_length" in out
    assert "3 dropped with every label masked" in out
