"""Security: weights only through safetensors, every other ``torch.load`` with ``weights_only=True``
(DCP's metadata pickle checked against an allow-list), ``trust_remote_code`` only when set.

Static checks read the source with ``ast``; behavioural ones plant a pickle that would create a
marker file when unpickled, and check that leantune refuses it and the marker never appears.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from leantune import checkpoint as ckpt
from leantune.cli import main
from leantune.config import ModelConfig, load_config
from leantune.trainer import Trainer
from tests.reliability.common import TINY

SRC = Path(__file__).resolve().parents[2] / "src" / "leantune"


def _calls():
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path.relative_to(SRC), node, ast.unparse(node.func)


def _kw(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def _is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def test_every_torch_load_is_weights_only():
    loads = [(f, n) for f, n, name in _calls() if name == "torch.load"]
    assert loads, "expected torch.load calls in leantune.checkpoint"
    bad = [f"{f}:{n.lineno}" for f, n in loads if not _is_true(_kw(n, "weights_only"))]
    assert not bad, bad


def test_nothing_is_unpickled_without_restrictions():
    banned = {"pickle.load", "pickle.loads", "torch.serialization.load", "dill.load", "joblib.load"}
    bad = [f"{f}:{n.lineno} {name}" for f, n, name in _calls() if name in banned]
    assert not bad, bad
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
                assert any(isinstance(s, ast.FunctionDef) and s.name == "find_class" for s in node.body)


def test_weights_are_written_and_read_only_as_safetensors():
    models = [(f, n, name) for f, n, name in _calls() if name.endswith("Model") or "ForCausalLM" in name]
    loads = [(f, n) for f, n, name in _calls() if name.endswith(".from_pretrained") and "Model" in name]
    loads = [(f, n) for f, n in loads if not ast.unparse(n.func).startswith("PeftModel")]
    assert loads and models  # both kinds of call exist, so the checks below check something
    assert all(_is_true(_kw(n, "use_safetensors")) for _, n in loads), [f"{f}:{n.lineno}" for f, n in loads]
    saves = [
        (f, n, name) for f, n, name in _calls() if name.endswith(".save_pretrained") and "tok" not in name
    ]
    assert saves
    bad = [f"{f}:{n.lineno}" for f, n, _ in saves if not _is_true(_kw(n, "safe_serialization"))]
    assert not bad, bad
    # torch.save writes only the trainer's own state (no weights): one place, one file
    torch_saves = [f"{f}:{n.lineno}" for f, n, name in _calls() if name == "torch.save"]
    assert torch_saves == [f"checkpoint.py:{_line_of('def save_torch') + 1}"]
    uses = [(f, n) for f, n, name in _calls() if name in ("ckpt.save_torch", "checkpoint.save_torch")]
    assert all("training_state.pt" in ast.unparse(n) for _, n in uses) and uses


def _line_of(text: str) -> int:
    return next(
        i for i, line in enumerate((SRC / "checkpoint.py").read_text().splitlines(), 1) if text in line
    )


def test_trust_remote_code_is_off_unless_the_user_sets_it():
    assert ModelConfig().trust_remote_code is False
    passed = [(f, n) for f, n, _ in _calls() if _kw(n, "trust_remote_code") is not None]
    assert passed
    for f, n in passed:  # always forwarded from the caller, never switched on here
        value = _kw(n, "trust_remote_code")
        assert not isinstance(value, ast.Constant), f"{f}:{n.lineno}"
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code":
                        assert isinstance(default, ast.Constant) and default.value is False, (
                            f"{path.name}:{node.lineno}"
                        )
            if isinstance(node, ast.Call) and "--trust-remote-code" in ast.unparse(node):
                assert ast.unparse(_kw(node, "action")) == "'store_true'"


# --------------------------------------------------------------------------- behaviour

MARKER = "pwned"


class Evil:
    """Creates the marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write({MARKER!r})",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("secure")
    args = [*TINY, "train.max_steps=2", "train.save_every=1", f"train.output_dir={out}", "train.run_name=r"]
    Trainer(load_config(None, args)).run()
    return out / "r", args


def _tamper(trained, tmp_path, how):
    run_dir, args = trained
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    newest = ckpt.find_checkpoints(copy / "checkpoints")[-1]
    marker = tmp_path / "marker"
    how(newest, marker)
    (newest / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(newest, {"step": 2})  # whoever can plant files can rewrite the manifest
    ckpt.verify_checkpoint(newest)
    resume = [*args, f"train.output_dir={tmp_path}", "train.resume=auto", "train.max_steps=3"]
    return newest, marker, resume


def _training_state(newest, marker):
    state = torch.load(newest / "training_state.pt", weights_only=True)
    state["per_rank"][0]["evil"] = Evil(marker)
    torch.save(state, newest / "training_state.pt")


def _dcp_metadata(newest, marker):
    (newest / "optim" / ".metadata").write_bytes(pickle.dumps(Evil(marker)))


def _dcp_value(newest, marker):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    run_dir = newest.parents[1]
    cfg = load_config(None, [*TINY, f"train.output_dir={run_dir.parent}", "train.run_name=scratch"])
    t = Trainer(cfg)
    t.setup()
    t.optimizer.init_state()
    osd = get_optimizer_state_dict(t.model, t.optimizer)
    first = next(iter(osd["state"]))
    osd["state"][first]["step"] = Evil(marker)  # a non-tensor value: DCP pickles it as bytes
    t.close()
    shutil.rmtree(newest / "optim")
    with ckpt._single_process_is_fine():
        dcp.save({"optim": osd}, checkpoint_id=str(newest / "optim"))
    shutil.rmtree(run_dir.parent / "scratch")


@pytest.mark.parametrize(
    ("how", "file"),
    [(_training_state, "training_state.pt"), (_dcp_metadata, "optim"), (_dcp_value, "optim")],
    ids=["training_state.pt", "optim/.metadata", "optim/__0_0.distcp"],
)
def test_a_checkpoint_with_a_malicious_pickle_is_refused_not_executed(trained, tmp_path, capsys, how, file):
    newest, marker, resume = _tamper(trained, tmp_path, how)
    assert main(["train", *resume]) == 2
    err = capsys.readouterr().err
    assert f"{newest / file}: refusing to load it: it holds objects other than tensors" in err, err
    assert "tampered" in err and "Traceback" not in err
    assert not marker.exists()
    if how is _dcp_metadata:  # the payload is live: DCP's own reader would have run it
        from torch.distributed.checkpoint import FileSystemReader

        with pytest.raises(Exception):  # noqa: B017 - what fails after the payload ran varies
            FileSystemReader(str(newest / "optim")).read_metadata()
        assert marker.read_text() == MARKER


def _bin_only_model(tmp_path, marker):
    from leantune.data import build_byte_tokenizer

    model = tmp_path / "model"
    build_byte_tokenizer().save_pretrained(model)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 263}))
    torch.save({"model.embed_tokens.weight": Evil(marker)}, model / "pytorch_model.bin")
    return model


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_pickled_model_weights_are_never_loaded(tmp_path, capsys, command):
    marker = tmp_path / "marker"
    model = _bin_only_model(tmp_path, marker)
    argv = {
        "train": ["train", *TINY, f"model.path={model}", f"train.output_dir={tmp_path / 'runs'}"],
        "eval": ["eval", str(model)],
        "generate": ["generate", str(model), "hi"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no *.safetensors weights (found pytorch_model.bin)" in err, err
    assert "pickles that can run code" in err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_pickled_adapter_weights_are_never_loaded(tmp_path):
    from leantune.adapters import AdapterError, load_adapter_model

    marker = tmp_path / "marker"
    base = _bin_only_model(tmp_path, marker)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(base)})
    )
    torch.save({"x": Evil(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(
        AdapterError, match="no adapter_model.safetensors: leantune reads adapter weights only"
    ):
        load_adapter_model(adapter)
    assert not marker.exists()


def test_custom_model_code_runs_only_with_trust_remote_code(tmp_path, capsys):
    from safetensors.torch import save_file

    from leantune.data import build_byte_tokenizer

    model, marker = tmp_path / "model", tmp_path / "marker"
    build_byte_tokenizer().save_pretrained(model)
    auto = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto}))
    code = f"open({str(marker)!r}, 'w').write({MARKER!r})\n"
    (model / "configuration_evil.py").write_text(code)
    (model / "modeling_evil.py").write_text(code)
    save_file({"w": torch.zeros(1)}, str(model / "model.safetensors"))
    out = tmp_path / "runs"
    assert main(["train", *TINY, f"model.path={model}", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "contains custom code" in err and "trust_remote_code" in err, err
    assert not marker.exists() and not out.exists()
