"""leantune.checkpoint function by function: how a failed write is described, the manifest, which
checkpoints are found and pruned, RNG states, the restricted loaders, sharded model and optimizer
state, and atomic_directory across ranks (threads, see tests/threaded.py).

test_checkpoints.py covers the same module end to end; these pin the edges it does not reach.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from leantune import checkpoint as ckpt
from tests.helpers import batch, loss_of, tiny_llama
from tests.threaded import run_ranks


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free}))


@pytest.fixture
def plenty_of_space(monkeypatch):
    _free(monkeypatch, 50 * 2**30)


def _shown(err: ckpt.CheckpointWriteError) -> str:
    """The cause as the message shows it (between the parentheses after the file)."""
    return re.fullmatch(r".* while writing \S+ \((.*)\)\. The partial .*", str(err), re.S).group(1)


def _dead_pid() -> int:
    return int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )


class Evil:
    """Creates ``marker`` when unpickled."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


# ------------------------------------------------------------ what a failed write is reported as
def test_the_cause_is_cut_to_its_first_300_characters(tmp_path, plenty_of_space):
    err = ckpt._describe_write_failure(tmp_path / "t", tmp_path / "missing", OSError(5, "x" * 1000))
    assert _shown(err) == ("OSError: [Errno 5] " + "x" * 1000)[:300]
    assert len(_shown(err)) == 300


def test_a_failures_attribute_that_is_no_dict_is_not_taken_for_dcps(tmp_path, plenty_of_space):
    # only torch.distributed.checkpoint's exception keeps per-rank failures in a dict
    cause = OSError(5, "I/O error")
    cause.failures = ["rank 1"]
    err = ckpt._describe_write_failure(tmp_path / "t", tmp_path / "missing", cause)
    assert _shown(err) == "OSError: [Errno 5] I/O error"


def test_a_full_disk_is_found_in_an_implicit_exception_context(tmp_path, plenty_of_space):
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("serialization failed")  # noqa: B904 - the implicit context is the case
    except RuntimeError as outer:
        err = ckpt._describe_write_failure(tmp_path / "t", tmp_path / "missing", outer)
    assert err is not None and err.disk_full


def _chain(depth: int) -> BaseException:
    """A RuntimeError whose ``depth``-th link (1 = itself) is a full disk."""
    err: BaseException = OSError(28, "No space left on device")
    for i in range(depth - 1):
        outer = RuntimeError(f"wrapper {i}")
        outer.__cause__ = err
        err = outer
    return err


def test_the_exception_chain_is_followed_for_eight_links(tmp_path, plenty_of_space):
    # bounded, so that a pathological chain cannot hang the error path
    target, tmp = tmp_path / "t", tmp_path / "missing"
    assert ckpt._describe_write_failure(target, tmp, _chain(8)).disk_full
    assert ckpt._describe_write_failure(target, tmp, _chain(9)) is None
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert ckpt._describe_write_failure(target, tmp, a) is None


@pytest.mark.parametrize(
    ("free", "full"), [(0, True), (2**20 - 1, True), (2**20, False), (3 * 2**19, False), (-1, False)]
)
def test_less_than_one_mib_free_counts_as_a_full_disk(tmp_path, monkeypatch, free, full):
    # torch's zip writer reports ENOSPC as "unexpected pos ...": only the free space tells
    if free < 0:
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: (_ for _ in ()).throw(OSError("gone")))
    else:
        _free(monkeypatch, free)
    err = ckpt._describe_write_failure(tmp_path / "t", tmp_path, RuntimeError("unexpected pos 1234"))
    assert (err is not None and err.disk_full) if full else err is None


def test_the_file_named_is_the_newest_not_the_last_by_name(tmp_path, plenty_of_space):
    tmp = tmp_path / ".step-000003.tmp-1"
    tmp.mkdir()
    (tmp / "z-old.bin").write_bytes(b"z")
    (tmp / "a-new.bin").write_bytes(b"a")
    os.utime(tmp / "z-old.bin", ns=(1, 1))
    err = ckpt._describe_write_failure(tmp_path / "step-000003", tmp, OSError(28, "No space left on device"))
    assert err.file == "a-new.bin" and "while writing a-new.bin (" in str(err)


def test_a_full_disk_during_atomic_directory_raises_a_write_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "checkpoints" / "step-000001"

    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointWriteError, match=r"while writing model\.safetensors") as info:
        ckpt.atomic_directory(target, write)
    assert info.value.disk_full and info.value.target == target
    assert list(target.parent.iterdir()) == []


# ------------------------------------------------------------------------------- the manifest
def test_the_manifest_records_version_size_and_sha256_of_every_file(tmp_path):
    d = tmp_path / "ckpt"
    (d / "model" / "sub").mkdir(parents=True)
    big = os.urandom(3 * 2**20 + 5)  # hashed in several blocks
    files = {"model/model.safetensors": big, "model/sub/x.json": b"{}", "training_state.pt": b""}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    (d / ckpt.MANIFEST).write_text("stale")  # a manifest never lists itself
    ckpt.write_manifest(d, {"step": 7})
    text = (d / ckpt.MANIFEST).read_text()
    expected_files = {
        rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in files.items()
    }
    assert json.loads(text) == {"version": 1, "files": expected_files, "meta": {"step": 7}}
    assert len(text.splitlines()) > 10  # indented: readable and diffable by a person
    ckpt.write_manifest(d)
    assert json.loads((d / ckpt.MANIFEST).read_text())["meta"] == {}


def test_every_directory_of_the_checkpoint_is_fsynced(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    for rel in ("model/sub/w.bin", "optim/.metadata", "top.pt"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(b"x")
    synced = []
    monkeypatch.setattr(ckpt, "_fsync_dir", synced.append)
    ckpt.write_manifest(d)
    assert sorted(synced) == sorted([d, d / "model", d / "model" / "sub", d / "optim"])


# ------------------------------------------------------------------ finding and pruning checkpoints
def _valid(root, *steps, data=b"w" * 100):
    for step in steps:
        name = step if isinstance(step, str) else f"step-{step:06d}"
        ckpt.atomic_directory(root / name, lambda tmp: (tmp / "w.bin").write_bytes(data))


def test_only_step_directories_are_checkpoints_in_numeric_order(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.find_checkpoints(root) == []
    _valid(root, "step-1000000", "step-999999", "step-10", "step-000000")  # past the 6-digit padding
    (root / "best-000009").mkdir()  # a user's copy: not a step directory
    (root / "step-latest").mkdir()
    (root / "step-000011").write_text("a file")
    (root / ".step-000012.tmp-1").mkdir()
    found = ckpt.find_checkpoints(root)
    assert [p.name for p in found] == ["step-000000", "step-10", "step-999999", "step-1000000"]


def _flip_a_byte(directory):
    path = directory / "w.bin"
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))


def test_without_checksums_only_sizes_are_checked(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _valid(root, 3, 6)
    _flip_a_byte(root / "step-000006")
    with pytest.warns(UserWarning, match="step-000006: w.bin is corrupt"):
        assert ckpt.latest_valid_checkpoint(root) == root / "step-000003"
    monkeypatch.setattr(ckpt, "_sha256", lambda path: pytest.fail(f"hashed {path}"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.latest_valid_checkpoint(root, checksums=False) == root / "step-000006"


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add a frame to the stack"
)
def test_the_skip_warning_points_at_the_caller(tmp_path):
    root = tmp_path / "checkpoints"
    _valid(root, 3)
    (root / "step-000006").mkdir()
    with pytest.warns(UserWarning, match="step-000006") as record:
        ckpt.latest_valid_checkpoint(root)
    assert [w.filename for w in record] == [__file__]


def test_pruning_reads_sizes_only_never_file_contents(tmp_path, monkeypatch):
    # pruning runs after every save: hashing gigabytes of old checkpoints each time is not an option
    root = tmp_path / "checkpoints"
    _valid(root, 3, 6, 9)
    monkeypatch.setattr(ckpt, "_sha256", lambda path: pytest.fail(f"hashed {path}"))
    assert [p.name for p in ckpt.prune_checkpoints(root, keep_last=1)] == ["step-000003", "step-000006"]
    assert [p.name for p in ckpt.find_checkpoints(root)] == ["step-000009"]


def test_pruning_goes_on_when_an_entry_cannot_be_removed(tmp_path):
    # a symlinked checkpoint or leftover: rmtree refuses links; the target must survive, pruning go on
    root, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere"
    _valid(root, 6, 9)
    _valid(elsewhere, 3)
    (root / "step-000003").symlink_to(elsewhere / "step-000003")
    stale = root / f".step-000012.tmp-{_dead_pid()}"
    stale.symlink_to(elsewhere / "step-000003")
    gone = root / f".step-000010.tmp-{_dead_pid()}"
    gone.mkdir()
    ckpt.prune_checkpoints(root, keep_last=1)
    assert not (root / "step-000006").exists() and not gone.exists()
    assert (root / "step-000009").is_dir()
    ckpt.verify_checkpoint(elsewhere / "step-000003")


def test_two_writers_clearing_the_same_stale_leftover_do_not_fail(tmp_path, monkeypatch):
    path = tmp_path / "trainer_state.json"
    leftover = tmp_path / f".trainer_state.json.tmp-{_dead_pid()}"
    leftover.write_text("half")
    real = ckpt._is_stale

    def other_writer_first(p):  # the other writer removes it between our glob and our unlink
        stale = real(p)
        p.unlink()
        return stale

    monkeypatch.setattr(ckpt, "_is_stale", other_writer_first)
    ckpt.write_text_atomic(path, "{}")
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ------------------------------------------------------------------------------------ RNG states
def _draws():
    return random.random(), torch.rand(3)


def test_rng_states_round_trip_for_python_and_torch():
    state = ckpt.capture_rng()
    first = _draws()
    _draws()
    ckpt.restore_rng(state)
    again = _draws()
    assert first[0] == again[0] and torch.equal(first[1], again[1])


class FakeCudaRng:
    """Stands in for one GPU's generator (the test machines have none)."""

    def __init__(self, monkeypatch) -> None:
        self.states = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def set_all(self, states) -> None:
        self.states = [s.clone() for s in states]


def test_the_gpu_generator_is_captured_and_restored(monkeypatch):
    gpu = FakeCudaRng(monkeypatch)
    state = ckpt.capture_rng()
    gpu.states = [torch.tensor([9, 9, 9], dtype=torch.uint8)]
    ckpt.restore_rng(state)
    assert [s.tolist() for s in gpu.states] == [[1, 2, 3]]


def test_a_state_saved_without_a_gpu_restores_on_a_machine_with_one(monkeypatch):
    state = ckpt.capture_rng()
    assert "cuda" not in state  # this machine has no GPU
    gpu = FakeCudaRng(monkeypatch)
    ckpt.restore_rng(state)
    assert [s.tolist() for s in gpu.states] == [[1, 2, 3]]  # left as it was


# ------------------------------------------------------------------------ restricted torch.load
def test_training_state_with_a_pickled_object_is_refused_not_executed(tmp_path, monkeypatch):
    # an environment asking torch for unrestricted loads must not switch the protection off
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, path = tmp_path / "marker", tmp_path / "training_state.pt"
    torch.save({"step": 3, "evil": Evil(marker)}, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_torch(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refusing to load it: it holds objects other than tensors")
    assert "was the checkpoint tampered with?" in message
    assert re.search(r"\[UnpicklingError: Weights only load failed", message), message
    assert not marker.exists()


def test_tensors_and_plain_containers_load(tmp_path):
    path = tmp_path / "training_state.pt"
    torch.save({"step": 3, "t": torch.arange(4), "nested": [1.5, ("a", None)]}, path)
    got = ckpt.load_torch(path)
    assert got["step"] == 3 and got["nested"] == [1.5, ("a", None)] and torch.equal(got["t"], torch.arange(4))


@pytest.fixture
def saved_on_a_gpu():
    """torch.save records every storage as being on ``cuda:0`` (as a checkpoint written on a GPU)."""
    entry = (0, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda s, loc: None)
    torch.serialization._package_registry.insert(0, entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


def test_a_training_state_written_on_a_gpu_loads_onto_the_cpu(tmp_path, saved_on_a_gpu):
    path = tmp_path / "training_state.pt"
    torch.save({"t": torch.arange(3.0)}, path)
    got = ckpt.load_torch(path)["t"]
    assert got.device.type == "cpu" and torch.equal(got, torch.arange(3.0))


# ---------------------------------------------------------------------------------- model weights
class Four(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(2, 2) for _ in range(4))


def test_a_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ckpt.CheckpointError, match=f"^{re.escape(str(tmp_path))}: no safetensors weights$"):
        ckpt.load_model_weights(Four(), tmp_path)


def test_missing_weights_are_refused_naming_the_first_five(tmp_path):
    save_file({"a.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_model_weights(Four(), tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: weights do not match the model (missing "
        "['a.bias', 'b.bias', 'b.weight', 'c.bias', 'c.weight'], unexpected [])"
    )


def test_unexpected_weights_are_refused_naming_the_first_five(tmp_path):
    state = {k: v.clone() for k, v in Four().state_dict().items()}
    state.update({f"x{i}": torch.zeros(1) for i in range(7)})
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_model_weights(Four(), tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: weights do not match the model (missing [], unexpected ['x0', 'x1', 'x2', 'x3', 'x4'])"
    )


def test_a_tied_head_loads_from_a_file_that_holds_it_once(tmp_path):
    saved = tiny_llama(1, tie=True)
    saved.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    model = tiny_llama(0, tie=True)
    ckpt.load_model_weights(model, tmp_path)
    for (name, p), q in zip(model.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --------------------------------------------------------- sharded (FSDP2) models, two ranks in threads
def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


class RecordingTokenizer:
    def __init__(self) -> None:
        self.saved_by: list[int] = []

    def save_pretrained(self, directory) -> None:
        import torch.distributed as dist

        self.saved_by.append(dist.get_rank())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_sharded_model_is_saved_whole_by_rank_0(tmp_path, tie):
    reference = tiny_llama(0, tie=tie)
    models = [tiny_llama(0, tie=tie) for _ in range(2)]  # built here: the threads share the global RNG
    tokenizer = RecordingTokenizer()

    def rank_fn(rank):
        model = models[rank]
        before = ckpt.is_sharded(model)
        _shard(model)
        shard = model.lm_head.weight
        flags = (before, ckpt.is_sharded(model), ckpt.is_shard(shard), ckpt.is_shard(shard.to_local()))
        ckpt.save_model(model, tokenizer, tmp_path)
        return flags

    assert run_ranks(2, rank_fn) == [(False, True, True, False)] * 2
    assert tokenizer.saved_by == [0]
    saved = load_file(str(tmp_path / "model.safetensors"))
    expected = reference.state_dict()
    if tie:
        del expected["lm_head.weight"]  # held once, as save_pretrained writes an unsharded tied model
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        assert saved[name].device.type == "cpu" and torch.equal(saved[name], value), name


@pytest.fixture
def gloo_world_of_one():
    # broadcast_from_rank0 needs a backend with a device, which the threaded one lacks
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_sharded_model_loads_whole_weights(tmp_path, gloo_world_of_one, tie):
    saved = tiny_llama(1, tie=tie)
    saved.save_pretrained(tmp_path)
    model = _shard(tiny_llama(0, tie=tie))
    ckpt.load_model_weights(model, tmp_path)
    got = {n: p.full_tensor() for n, p in model.named_parameters()}
    expected = dict(saved.named_parameters())
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


# ------------------------------------------------------------------------------- optimizer state
def _trained(seed=0, layers=2, steps=1):
    from leantune.optim import AdaLomo

    model = tiny_llama(seed, layers=layers)
    opt = AdaLomo(model, lr=0.05)
    for step in range(steps):
        opt.backward(loss_of(model, batch(step)))
    return model, opt


def _tensor_state(opt, model):
    names = {p: n for n, p in model.named_parameters()}
    return {
        (names[p], k): v.clone() for p, s in opt.state.items() for k, v in s.items() if torch.is_tensor(v)
    }


def test_optimizer_state_round_trips_into_a_fresh_optimizer(tmp_path):
    model, opt = _trained()
    ckpt.save_optimizer(model, opt, tmp_path / "optim")
    expected = _tensor_state(opt, model)
    fresh_model, fresh = _trained(steps=0)
    assert not fresh.state  # created lazily: the loader has to create it first
    ckpt.load_optimizer(fresh_model, fresh, tmp_path / "optim")
    got = _tensor_state(fresh, fresh_model)
    assert got.keys() == expected.keys() and expected
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_an_optimizer_saved_before_its_first_step_loads(tmp_path):
    model, opt = _trained(steps=0)
    ckpt.save_optimizer(model, opt, tmp_path / "optim")
    fresh_model, fresh = _trained(steps=0)
    ckpt.load_optimizer(fresh_model, fresh, tmp_path / "optim")
    assert fresh.state and all(
        torch.count_nonzero(v) == 0 for v in _tensor_state(fresh, fresh_model).values()
    )


def test_optimizer_state_of_another_model_is_refused_with_the_cause(tmp_path):
    small, small_opt = _trained(layers=1)
    ckpt.save_optimizer(small, small_opt, tmp_path / "optim")
    model, opt = _trained(steps=0)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_optimizer(model, opt, tmp_path / "optim")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'optim'}: cannot load the optimizer state (")
    assert "model.layers.1" in message and "refusing" not in message


def _dcp_save(osd, directory, **kwargs):
    import torch.distributed.checkpoint as dcp

    with ckpt._single_process_is_fine():
        dcp.save({"optim": osd}, checkpoint_id=str(directory), **kwargs)


def _osd(model, opt):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt)


def _assert_refused(info, directory, marker):
    message = str(info.value)
    assert message.startswith(f"{directory}: refusing to load it: it holds objects other than tensors"), (
        message
    )
    assert "tampered" in message and not marker.exists()


def test_a_pickled_object_in_the_optimizer_metadata_is_refused_not_executed(tmp_path):
    model, opt = _trained()
    directory, marker = tmp_path / "optim", tmp_path / "marker"
    ckpt.save_optimizer(model, opt, directory)
    (directory / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_optimizer(model, opt, directory)
    _assert_refused(info, directory, marker)
    assert "builtins.exec is not allowed in checkpoint metadata" in str(info.value)


def test_a_pickled_optimizer_value_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not switch the check off
    model, opt = _trained()
    directory, marker = tmp_path / "optim", tmp_path / "marker"
    osd = _osd(model, opt)
    first = next(iter(osd["state"]))
    osd["state"][first]["step"] = Evil(marker)  # a non-tensor value: DCP pickles it as bytes
    _dcp_save(osd, directory)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_optimizer(model, opt, directory)
    _assert_refused(info, directory, marker)
    assert "Weights only load failed" in str(info.value)


def test_rank_local_optimizer_metadata_loads_and_is_checked_too(tmp_path):
    # DCP saved without collectives writes __<rank>.metadata, which its loader falls back to
    model, opt = _trained()
    expected = _tensor_state(opt, model)
    directory, marker = tmp_path / "optim", tmp_path / "marker"
    _dcp_save(_osd(model, opt), directory, use_collectives=False)
    assert sorted(p.name for p in directory.glob("*metadata")) == ["__0.metadata"]
    fresh_model, fresh = _trained(steps=0)
    ckpt.load_optimizer(fresh_model, fresh, directory)
    got = _tensor_state(fresh, fresh_model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    (directory / "__0.metadata").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_optimizer(fresh_model, fresh, directory)
    assert not marker.exists()


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n.".encode()  # a pickle of one global (protocol 0)


MD = "torch.distributed.checkpoint.metadata"


@pytest.mark.parametrize(
    ("module", "name"),
    [(MD, "Metadata"), (MD, "TensorStorageMetadata"), ("torch", "float32"), ("torch", "Size"),
     ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("torch.serialization", "_get_layout")],
)  # fmt: skip
def test_the_metadata_unpickler_allows_what_dcp_metadata_holds(module, name):
    import importlib

    got = ckpt._MetadataUnpickler(io.BytesIO(_global(module, name))).load()
    assert got is getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("builtins", "exec"), ("torch", "load"), ("torch", "nonexistent"),
     ("builtins", "Metadata"), (MD, "nonexistent"), (MD, "torch"), (MD, "Enum")],
    ids=["os.system", "exec", "torch.load", "torch.nonexistent", "same-name-elsewhere", "md.nonexistent",
         "md.imported-module", "md.imported-class"],
)  # fmt: skip
def test_the_metadata_unpickler_refuses_everything_else(module, name):
    with pytest.raises(
        pickle.UnpicklingError, match=rf"^{re.escape(module)}\.{name} is not allowed in checkpoint"
    ):
        ckpt._MetadataUnpickler(io.BytesIO(_global(module, name))).load()


# ------------------------------------------------------------------- atomic_directory across ranks
def test_all_ranks_write_into_one_shared_temporary_directory(tmp_path):
    target = tmp_path / "checkpoints" / "step-000004"

    def rank_fn(rank):
        seen = []

        def write(tmp):
            seen.append(tmp.name)
            (tmp / f"rank{rank}.bin").write_bytes(bytes([rank]))

        return ckpt.atomic_directory(target, write, meta={"step": 4}), seen

    assert run_ranks(2, rank_fn) == [(target, [".step-000004.tmp-dist"])] * 2
    manifest = json.loads((target / ckpt.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["rank0.bin", "rank1.bin"] and manifest["meta"] == {"step": 4}
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-000004"]


def test_a_failure_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    target = tmp_path / "checkpoints" / "step-000004"
    _valid(target.parent, 4, data=b"old")

    def rank_fn(rank):
        def write(tmp):
            (tmp / f"rank{rank}.bin").write_bytes(b"new")
            if rank == 1:
                raise ValueError("a bug on rank 1")

        try:
            ckpt.atomic_directory(target, write)
        except Exception as err:  # noqa: BLE001 - returned to compare across ranks
            return type(err).__name__, str(err)
        return None

    assert run_ranks(2, rank_fn) == [
        ("CheckpointError", f"{target}: the save failed on another rank"),
        ("ValueError", "a bug on rank 1"),
    ]
    assert (target / "w.bin").read_bytes() == b"old"
    ckpt.verify_checkpoint(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-000004"]


def test_when_rank_0_cannot_prepare_the_directory_every_rank_fails(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the directory should be")
    target = tmp_path / "checkpoints" / "step-000004"

    def rank_fn(rank):
        try:
            ckpt.atomic_directory(target, lambda tmp: pytest.fail("written although unprepared"))
        except Exception as err:  # noqa: BLE001 - returned to compare across ranks
            return type(err).__name__, str(err)
        return None

    on_0, on_1 = run_ranks(2, rank_fn)
    assert on_0[0] in ("FileExistsError", "NotADirectoryError")
    assert on_1 == ("CheckpointError", f"{target}: another rank could not prepare the checkpoint directory")
