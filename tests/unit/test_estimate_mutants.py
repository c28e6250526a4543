"""leantune.estimate where mutation testing found it unguarded: the errors a user reads when a model
directory is wrong, reading config.json whatever the locale, how a spec is told to be a directory,
the field validation, how family configs become shapes (k/v heads, tied heads, MLP width, build
failures, the fake-model cache), the update chunk and AdaLomo's state of 3-D experts, and the terms
of moments and setups the other estimate tests never made the peak (checkpointing, accumulation,
fp32 FSDP, layers that differ)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from leantune.estimate import (
    MiB,
    ModelShape,
    TrainSetup,
    activation_bytes_per_token,
    estimate_memory,
    format_bytes,
)
from tests.unit.test_estimate_model import LLAMA_FIELDS


def _model_dir(path: Path, config: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# ------------------------------------------------------------------------- model directories
def test_a_missing_model_directory_is_named_in_the_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as err:
        ModelShape.from_hf_dir(missing)
    assert str(err.value) == f"model directory {str(missing)!r} does not exist"


def test_a_home_directory_of_no_such_user_is_a_missing_model_directory():
    with pytest.raises(FileNotFoundError, match=r"^model directory '~nosuchuser-lt/x' does not exist$"):
        ModelShape.resolve("~nosuchuser-lt/x")


def test_a_directory_without_config_json_is_named_and_the_error_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ModelShape.from_hf_dir(tmp_path)
    assert str(err.value) == (
        f"model directory {str(tmp_path)!r} has no config.json: give a local Hugging Face model "
        "directory or a preset name"
    )


def test_a_config_json_that_is_not_an_object_is_refused_with_its_path(tmp_path):
    model = _model_dir(tmp_path / "listed", [LLAMA_FIELDS])
    with pytest.raises(ValueError) as err:
        ModelShape.from_hf_dir(model)
    assert str(err.value) == f"{model / 'config.json'}: expected a JSON object"


def test_a_utf8_config_json_is_read_under_a_locale_that_is_not_utf8(tmp_path):
    # config.json is UTF-8 (the Hub writes it so) whatever the platform's locale encoding, e.g.
    # cp1252 on Windows; a POSIX locale without UTF-8 mode (ASCII) stands in for it here.
    model = tmp_path / "model"
    model.mkdir()
    text = json.dumps({**LLAMA_FIELDS, "_name_or_path": "modèle/模型"}, ensure_ascii=False)
    (model / "config.json").write_bytes(text.encode("utf-8"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8"))}
    env |= {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    code = (
        "import sys; from leantune.estimate import ModelShape; "
        "print(ModelShape.from_hf_dir(sys.argv[1]).hidden_size)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(model)], env=env, capture_output=True, text=True)
    assert (run.returncode, run.stdout.strip()) == (0, "64"), run.stderr


# ------------------------------------------------------------------- spec: directory or preset
def test_a_spec_with_a_backslash_or_a_leading_dot_is_a_directory_not_a_preset():
    # Windows-style and hidden relative paths: the user meant a directory, so the error says it
    # does not exist instead of suggesting presets.
    for spec in ("models\\missing", ".my-model"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"model directory {spec!r} does not exist")):
            ModelShape.resolve(spec)


def test_a_spec_naming_an_existing_directory_or_home_is_read_as_a_model_directory(tmp_path, monkeypatch):
    _model_dir(tmp_path / "mymodel", LLAMA_FIELDS)
    monkeypatch.chdir(tmp_path)
    shape = ModelShape.resolve("mymodel")  # no separator: a directory because it exists
    assert (shape.hidden_size, shape.name) == (64, "mymodel")
    monkeypatch.setenv("HOME", str(tmp_path / "mymodel"))
    home = ModelShape.resolve("~")  # "~" expands to the home directory
    assert (home.hidden_size, home.num_layers, home.name) == (64, 3, "~")


# -------------------------------------------------------------------------------- validation
def test_sizes_must_be_true_integers_not_booleans_or_floats():
    base = dict(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                head_dim=4, vocab_size=10)  # fmt: skip
    # True == 1 and 2.0 == 2 would pass a mere range check: the message shows what was given
    for bad in (True, 8.0):
        with pytest.raises(ValueError, match=rf"^Invalid hidden_size: {bad!r} \(must be an int >= 1\)$"):
            ModelShape(**{**base, "hidden_size": bad})
    with pytest.raises(ValueError, match=r"^Invalid seq_len: True \(must be an int >= 1\)$"):
        TrainSetup(seq_len=True)
    with pytest.raises(ValueError, match=r"^Invalid batch_size: 2\.5 \(must be an int >= 1\)$"):
        TrainSetup(batch_size=2.5)


# ------------------------------------------------------------------- family configs -> shapes
FALCON = {"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
          "vocab_size": 100, "ffn_hidden_size": 128}  # fmt: skip


def test_falcon_with_the_new_decoder_architecture_keeps_its_kv_heads_even_when_multi_query():
    # Falcon's config names them num_kv_heads, and its new architecture (40B, 180B) builds
    # num_kv_heads k/v heads whatever multi_query says (FalconAttention's query_key_value width).
    for multi_query in (True, False):
        shape = ModelShape.from_hf_config(
            {**FALCON, "new_decoder_architecture": True, "num_kv_heads": 2, "multi_query": multi_query}
        )
        assert (shape.num_heads, shape.num_kv_heads) == (4, 2), multi_query


def test_gpt_bigcode_is_multi_query_with_or_without_a_kv_head_count_in_its_config():
    # GPTBigCode (SantaCoder, StarCoder) has multi_query and no new_decoder_architecture at all.
    gpt_bigcode = {"model_type": "gpt_bigcode", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100}
    assert ModelShape.from_hf_config(gpt_bigcode).num_kv_heads == 1
    # transformers 4.x (pyproject allows >= 4.45) has no num_key_value_heads in GPTBigCodeConfig:
    # multi_query alone must then give the single k/v head.
    from types import SimpleNamespace

    v4 = SimpleNamespace(model_type="gpt_bigcode", hidden_size=64, num_attention_heads=4, vocab_size=100,
                         multi_query=True, tie_word_embeddings=True)  # fmt: skip
    assert ModelShape._from_transformers(gpt_bigcode, v4, "custom").num_kv_heads == 1


def test_latent_attention_whose_kv_head_count_does_not_divide_the_heads_has_one_kv_per_head():
    # DeepSeek's multi-head latent attention expands k/v from its latent for every head: the
    # config's num_key_value_heads shapes nothing, and a count that does not divide the heads must
    # not make the shape invalid.
    from tests.families import COMMON, FAMILIES

    config = {**COMMON, **FAMILIES["deepseek_v3"], "model_type": "deepseek_v3", "vocab_size": 100,
              "num_key_value_heads": 3}  # fmt: skip
    shape = ModelShape.from_hf_config(config)
    assert (shape.num_heads, shape.num_kv_heads) == (4, 4)


def test_a_family_mlp_one_unit_wide_is_read_as_one_wide():
    config = {"model_type": "llama", **LLAMA_FIELDS, "intermediate_size": 1}
    assert ModelShape.from_hf_config(config).intermediate_size == 1


def test_a_family_mlp_as_wide_as_the_hidden_size_is_read_at_that_width():
    # No projection comes back from another width, so the feed-forward width is the stream's.
    from tests.families import COMMON, FAMILIES

    config = {**COMMON, **FAMILIES["gpt2"], "model_type": "gpt2", "vocab_size": 100, "n_inner": 64}
    assert ModelShape.from_hf_config(config).intermediate_size == COMMON["hidden_size"] == 64


def test_a_family_config_class_without_tie_word_embeddings_is_read_as_untied():
    # Mllama's top-level config has no tie_word_embeddings; its causal LM has an lm_head of its own.
    text = {**LLAMA_FIELDS, "num_hidden_layers": 2, "num_key_value_heads": 2, "cross_attention_layers": [1],
            "pad_token_id": 0}  # fmt: skip
    config = {"model_type": "mllama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100,
              "text_config": text}  # fmt: skip
    shape = ModelShape.from_hf_config(config)
    assert not shape.tie_word_embeddings
    assert ("lm_head.weight", (100, 64)) in shape.root_tensors()


def _fresh_footprints(monkeypatch) -> list[str]:
    """Empty the estimator's footprint caches and record every fake-model build (its dtype)."""
    import leantune.footprint as footprint
    from leantune.estimate import _footprint, _params_footprint

    _footprint.cache_clear()
    _params_footprint.cache_clear()
    builds: list[str] = []
    real = footprint.model_footprint

    def counted(config, dtype, **kwargs):
        builds.append(dtype)
        return real(config, dtype, **kwargs)

    monkeypatch.setattr(footprint, "model_footprint", counted)
    return builds


def test_a_family_that_transformers_cannot_build_reports_the_first_line_of_its_error(monkeypatch):
    import leantune.footprint as footprint

    _fresh_footprints(monkeypatch)
    config = {"model_type": "llama", **LLAMA_FIELDS}

    def fails(error):
        def build(config, dtype, **kwargs):
            raise error

        return build

    # the first line only: tracebacks of modelling code can be long
    monkeypatch.setattr(footprint, "model_footprint", fails(RuntimeError("shapes do not match\nat line 3")))
    with pytest.raises(ValueError) as err:
        ModelShape.from_hf_config(config, name="dir")
    assert str(err.value) == (
        "dir: transformers cannot build a causal LM (llama) from this config.json: shapes do not match"
    )
    # an error without a message is named by its type
    monkeypatch.setattr(footprint, "model_footprint", fails(ZeroDivisionError()))
    with pytest.raises(ValueError) as err:
        ModelShape.from_hf_config(config, name="dir")
    assert str(err.value).endswith("from this config.json: ZeroDivisionError")


def test_a_family_config_is_built_on_fake_tensors_once_whatever_the_order_of_its_keys(monkeypatch):
    # The fake forward is the slow part of an estimate (seconds for a large model): reading the
    # shape, its tensors and its footprint must share one build.
    builds = _fresh_footprints(monkeypatch)
    config = {"vocab_size": 100, "model_type": "llama", **LLAMA_FIELDS, "num_key_value_heads": 2}
    shape = ModelShape.from_hf_config(config)
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64 + 2 * 64  # q, o; k, v; gate, up, down; norms
    assert shape.parameters == 3 * per_layer + 2 * 100 * 64 + 64
    assert len(shape.layer_tensors()) == 9 and not shape.footprint().experts
    assert builds == ["fp32"]
    reordered = ModelShape.from_hf_config(dict(reversed(list(config.items()))))
    assert reordered.parameters == shape.parameters and builds == ["fp32"]


def test_the_footprint_of_a_shape_is_of_unpadded_batches_by_default():
    # SDPA without a padding mask saves nothing that grows with the square of the length; a padded
    # batch saves its L x L mask per layer.
    shape = ModelShape.from_hf_config({"model_type": "llama", **LLAMA_FIELDS, "num_key_value_heads": 2})
    assert [layer.per_token_sq for layer in shape.footprint().layers] == [0, 0, 0]
    assert all(layer.per_token_sq > 0 for layer in shape.footprint("fp32", padded=True).layers)


# ----------------------------------------------------------------------- optimizer memory model
@pytest.mark.parametrize(
    "shape",
    [(301,), (5_000_001,), (1100, 4096), (2, 3_000_000), (8, 1000, 1536)],
    ids=["odd-vector", "vector-over-a-chunk", "matrix-two-chunks", "row-over-half-a-chunk", "experts-3d"],
)
def test_the_estimated_update_chunk_is_the_engines(shape):
    """The fused updates walk a tensor in chunks of whole rows of its 2-D view (a vector is one
    column, a 3-D expert tensor ``(E x out) x in``), at most CHUNK_ELEMENTS but at least one row:
    the estimator's chunk (AdaLomo's workspace, the fp32 copies) against the engine's own split."""
    import torch

    from leantune.estimate import _chunk
    from leantune.optim.engine import DEFAULT_CHUNK_ELEMENTS, as_rows, row_chunks

    rows, cols = as_rows(torch.empty(shape, device="meta")).shape
    first = next(row_chunks(rows, cols, DEFAULT_CHUNK_ELEMENTS))
    assert _chunk(shape) == (first.stop - first.start) * cols


def test_adalomo_state_of_3d_expert_tensors_equals_the_real_optimizers():
    """A MoE model's experts are 3-D parameters: AdaLomo keeps a row statistic per row of the
    ``(E x out) x in`` view and one per column. Its state after a step (statistics + workspace)
    is the estimate's optimizer state."""
    import torch
    from transformers import AutoModelForCausalLM

    from leantune.optim import AdaLomo
    from tests.families import tiny_config

    cfg = tiny_config("mixtral", vocab_size=96)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    experts = [p.shape for p in model.parameters() if p.dim() == 3]
    assert experts and all(s[1] != s[2] for s in experts)  # rows and columns tell apart
    opt = AdaLomo(model, lr=1e-3)
    ids = torch.arange(16).remainder(96).unsqueeze(0)
    opt.backward(model(input_ids=ids, labels=ids).loss)
    stats = sum(t.numel() * 4 for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    real = stats + sum(b.numel() * 4 for b in opt._buffers.values())
    shape = ModelShape.from_hf_config(cfg.to_dict())
    assert estimate_memory(shape, TrainSetup(optimizer="adalomo", dtype="fp32")).optimizer_state == real


def test_adafactor_state_of_3d_expert_tensors_equals_torchs():
    """torch's Adafactor keeps ``(E, R, 1)`` and ``(E, 1, C)`` statistics for an ``E x R x C``
    tensor (a row and a column statistic per expert matrix), not AdaLomo's flattened view."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.families import tiny_config

    cfg = tiny_config("mixtral", vocab_size=96)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-3)
    ids = torch.arange(16).remainder(96).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    real = sum(t.numel() * 4 for s in opt.state.values() for k, t in s.items() if k != "step")
    shape = ModelShape.from_hf_config(cfg.to_dict())
    assert estimate_memory(shape, TrainSetup(optimizer="adafactor", dtype="fp32")).optimizer_state == real


# ---------------------------------------------------------------------------- the peak moment
SMALL = ModelShape(hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=16, vocab_size=1000)  # fmt: skip
SMALL_LAYER = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64 + 2 * 64  # q, o; k, v; gate, up, down; norms
SMALL_PARAMS = 3 * SMALL_LAYER + 2 * 1000 * 64 + 64  # + embedding, lm_head, final norm


def test_fsdp_in_fp32_gathers_its_units_in_fp32():
    # Without a mixed-precision policy FSDP2 all-gathers in the parameters' dtype: the local half
    # of every weight plus the other halves of two layers and the head, 4 bytes each.
    b = estimate_memory(SMALL, TrainSetup(optimizer="adamw", dtype="fp32", world_size=2, strategy="fsdp"))
    assert b.weights == SMALL_PARAMS * 4 // 2 + (1000 * 64 + 2 * SMALL_LAYER) * 4 // 2


def test_ordinary_optimizers_keep_grads_in_the_weight_dtype_between_micro_batches():
    # .grad of every parameter, bf16 like the weights, is alive through the next micro-batch's
    # forward and backward; at step() it is the gradients step() reads anyway.
    setup = dict(optimizer="adamw", dtype="bf16", loss_chunk=0)
    plain, accum = (estimate_memory(SMALL, TrainSetup(**setup, accumulation_steps=n)) for n in (1, 4))
    for moment, total in plain.moments.items():
        held = 0 if moment == "optimizer step" else SMALL_PARAMS * 2
        assert accum.moments[moment] - total == held, moment


def test_the_backward_of_the_last_layer_as_the_peak_shows_its_own_terms():
    """A short vocabulary, a wide MLP and long sequences under checkpointing: the recomputed last
    layer is the peak. Its gradients are lm_head's (an ordinary optimizer keeps it until step())
    and the layer's largest; its activations the kept layer inputs, RoPE's tables and the
    recomputed layer (bf16: the residual stream is not saved twice); its temporaries the MLP's
    backward."""
    shape = ModelShape(hidden_size=64, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, vocab_size=64)  # fmt: skip
    setup = TrainSetup(optimizer="adamw", dtype="bf16", seq_len=2048, grad_checkpointing=True, loss_chunk=0)
    b = estimate_memory(shape, setup)
    tokens = 2048
    layer = tokens * activation_bytes_per_token(shape, "bf16")["layer"]
    assert b.moment == "last layer backward"
    assert b.gradients == 64 * 64 * 2 + 512 * 64 * 2
    assert b.activations == 2 * tokens * 64 * 2 + 2 * 2048 * 16 * 2 + layer
    assert b.temporaries == 2 * tokens * (64 + 2 * 512)
    assert b.total == max(b.moments.values())


def test_a_term_of_exactly_one_mib_keeps_its_note():
    # Notes are left out only for terms under a MiB; 256 tokens x 1024 vocab of fp32 logits is one.
    shape = ModelShape(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, vocab_size=1024)  # fmt: skip
    b = estimate_memory(shape, TrainSetup(optimizer="lomo", dtype="fp32", seq_len=256, loss_chunk=256))
    assert (b.moment, b.logits) == ("chunked loss", MiB)
    assert b.notes["logits"] == "one chunk: 256 of 256 tokens x 1024 vocab (train.loss_chunk)"


# ----------------------------------------------------------- activations counted on a family's code
def _llama_family(**fields) -> ModelShape:
    config = {"model_type": "llama", **LLAMA_FIELDS, "num_key_value_heads": 2, **fields}
    return ModelShape.from_hf_config(config)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "mixed"])
def test_a_llama_config_counted_on_its_own_code_agrees_with_the_llama_formulas(dtype):
    # Two independent counts of the same model (fake-tensor forward, closed forms checked against
    # autograd): every moment, the tail's input ids and labels included, is the same.
    formulas = ModelShape.from_hf_config({**LLAMA_FIELDS, "num_key_value_heads": 2})
    setup = TrainSetup(optimizer="adalomo", dtype=dtype, seq_len=256, loss_chunk=0)
    family = estimate_memory(_llama_family(), setup)
    assert family.notes["model"].startswith("parameters and activations counted on the family's")
    assert family.moments == estimate_memory(formulas, setup).moments


@pytest.mark.parametrize(("dtype", "residual"), [("fp32", 4), ("bf16", 2), ("mixed", 4)])
def test_checkpointing_keeps_each_layer_input_in_the_dtype_of_the_residual_stream(dtype, residual):
    # One layer more keeps one more layer input: hidden_size values per token, fp32 under mixed
    # (autocast leaves the residual stream in fp32).
    setup = TrainSetup(optimizer="lomo", dtype=dtype, seq_len=256, grad_checkpointing=True, loss_chunk=0)
    two, three = (estimate_memory(_llama_family(num_hidden_layers=n), setup) for n in (2, 3))
    assert two.moment == three.moment
    assert three.activations - two.activations == 256 * 64 * residual


def test_checkpointing_recomputes_the_last_layer_when_the_layers_differ():
    # DeepSeek with two dense layers and then a MoE layer, against the same with three dense ones:
    # backward starts by recomputing the last layer, so only its saved bytes tell them apart.
    from tests.families import COMMON, FAMILIES

    def deepseek(dense: int) -> ModelShape:
        return ModelShape.from_hf_config({**COMMON, **FAMILIES["deepseek_v3"], "model_type": "deepseek_v3",
                                          "vocab_size": 100, "num_hidden_layers": 3,
                                          "first_k_dense_replace": dense})  # fmt: skip

    moe, dense = deepseek(2), deepseek(3)
    setup = TrainSetup(optimizer="lomo", seq_len=2048, grad_checkpointing=True, loss_chunk=0)
    a, b = estimate_memory(moe, setup), estimate_memory(dense, setup)
    assert a.moment == b.moment == "last layer backward"
    last = [shape.footprint("bf16").layers[-1].saved(2048) for shape in (moe, dense)]
    assert last[0] > last[1]
    assert a.activations - b.activations == last[0] - last[1]


def test_the_activation_note_gives_the_mean_layer_when_the_layers_differ():
    # Counted on the family's code the first layer also holds RoPE's cos/sin tables: two sizes.
    seq = 4096
    b = estimate_memory(_llama_family(num_hidden_layers=2),
                        TrainSetup(optimizer="floor", dtype="fp32", seq_len=seq, loss_chunk=0))  # fmt: skip
    formulas = ModelShape.from_hf_config({**LLAMA_FIELDS, "num_key_value_heads": 2})
    layer = seq * activation_bytes_per_token(formulas, "fp32")["layer"]
    rope = 2 * seq * 16 * 4
    mean = (2 * layer + rope) / 2
    expected = f"2 layers x {format_bytes(mean)} (mean), counted on the family's own code"
    assert b.notes["activations"] == expected
