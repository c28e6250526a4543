"""leantune.estimate in detail: how a config becomes a shape, the tensors of a shape, the table the
CLI prints, and every moment of the memory model restated tensor by tensor.

``test_estimate.py`` checks the model against what torch really allocates and saves; this file pins
the model down exactly, so that a changed term is a deliberate change of the spec (and of the
ledger below), never an accident.
"""

from __future__ import annotations

import math

import pytest

from leantune.estimate import (
    CHUNK_ELEMENTS,
    CPU_IMPORT_OVERHEAD,
    CPU_RUNTIME_OVERHEAD,
    CUDA_CONTEXT_OVERHEAD,
    GiB,
    KiB,
    MemoryBreakdown,
    MiB,
    ModelShape,
    TrainSetup,
    activation_bytes_per_token,
    canonical_optimizer,
    estimate_memory,
    format_bytes,
    parse_size,
)
from leantune.estimate import _count as count_text

# --------------------------------------------------------------------------- config -> shape
LLAMA_FIELDS = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "vocab_size": 100,
}


def test_a_config_transformers_does_not_know_is_read_by_the_llama_field_names():
    # no model_type: the LLaMA formulas, each field read from its own key, the documented defaults
    assert ModelShape.from_hf_config(dict(LLAMA_FIELDS)) == ModelShape(
        hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=4, head_dim=16,
        vocab_size=100, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, name="custom",
    )  # fmt: skip
    full = {**LLAMA_FIELDS, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True,
            "attention_bias": True, "mlp_bias": True}  # fmt: skip
    shape = ModelShape.from_hf_config(full, name="mine")
    assert shape == ModelShape(
        hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
        vocab_size=100, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, name="mine",
    )  # fmt: skip
    assert shape.config is None and shape.footprint() is None


def test_a_multimodal_config_uses_its_text_config_only_when_the_top_level_has_no_width():
    nested = {"text_config": dict(LLAMA_FIELDS)}
    assert ModelShape.from_hf_config(nested).hidden_size == 64
    both = {**LLAMA_FIELDS, "hidden_size": 128, "text_config": {**LLAMA_FIELDS, "hidden_size": 32}}
    assert ModelShape.from_hf_config(both).hidden_size == 128


def test_missing_fields_are_named_in_order():
    partial = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": None}
    with pytest.raises(ValueError) as err:
        ModelShape.from_hf_config(partial, name="dir")
    assert str(err.value) == (
        "dir: config.json has no intermediate_size, num_hidden_layers, vocab_size (not a decoder LM config?)"
    )


def test_a_family_transformers_knows_is_read_through_its_config_class():
    llama = ModelShape.from_hf_config({"model_type": "llama", **LLAMA_FIELDS, "num_key_value_heads": 2})
    assert (llama.hidden_size, llama.intermediate_size, llama.num_layers) == (64, 160, 3)
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.vocab_size) == (4, 2, 16, 100)
    assert (llama.tie_word_embeddings, llama.name, llama.config["model_type"]) == (False, "custom", "llama")
    # GPT-2's own names (n_embd, n_head, n_layer) through its attribute map; the MLP is 4h wide
    gpt2 = ModelShape.from_hf_config(
        {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100}, name="g"
    )
    assert (gpt2.hidden_size, gpt2.intermediate_size, gpt2.num_layers) == (64, 256, 2)
    assert (gpt2.num_heads, gpt2.num_kv_heads, gpt2.head_dim) == (4, 4, 16)
    assert (gpt2.vocab_size, gpt2.tie_word_embeddings, gpt2.name) == (100, True, "g")
    # Falcon's multi-query attention: one k/v head unless the new decoder architecture says otherwise
    falcon = {"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "vocab_size": 100, "multi_query": True, "new_decoder_architecture": False}  # fmt: skip
    assert ModelShape.from_hf_config(falcon).num_kv_heads == 1


def test_shape_fields_are_validated_by_name():
    base = dict(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                head_dim=4, vocab_size=10)  # fmt: skip
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim", "vocab_size"):
        with pytest.raises(ValueError, match=rf"^Invalid {key}: 0 \(must be an int >= 1\)$"):
            ModelShape(**{**base, key: 0})
    with pytest.raises(ValueError, match=r"^num_heads 2 is not a multiple of num_kv_heads 3$"):
        ModelShape(**{**base, "num_kv_heads": 3})


def test_preset_errors_and_vocab_override():
    from leantune.models import PRESETS

    known = ", ".join(PRESETS)
    with pytest.raises(ValueError) as err:
        ModelShape.from_preset("0.37")
    assert str(err.value) == (
        f"Unknown model preset '0.37'. Did you mean '0.37b'? Known presets: {known} "
        "(or give a local Hugging Face model directory)"
    )
    with pytest.raises(ValueError) as err:
        ModelShape.from_preset("zzzz")
    assert str(err.value).startswith("Unknown model preset 'zzzz'. Known presets:")
    assert ModelShape.from_preset("0.1b", vocab_size=123).vocab_size == 123
    assert ModelShape.from_preset("0.1b").vocab_size == PRESETS["0.1b"].vocab_size


def test_unknown_optimizer_message_suggests_one_name_and_explains_sophia():
    with pytest.raises(ValueError) as err:
        TrainSetup(optimizer="adamx")
    head, known = str(err.value).split(" Known: ")
    assert head == "Unknown optimizer 'adamx'. Did you mean 'adamw'?"
    assert known.split(", ")[:3] == ["adalomo", "lomo", "adamw"] and known.endswith("floor")
    with pytest.raises(ValueError) as err:
        TrainSetup(optimizer="sophia")
    assert " Sophia keeps the graph of the gradients and is not modelled. Known:" in str(err.value)
    with pytest.raises(ValueError) as err:
        TrainSetup(optimizer="qqqqqq")
    assert str(err.value).startswith("Unknown optimizer 'qqqqqq'. Known: adalomo, lomo")
    assert canonical_optimizer("floor") == "floor" and canonical_optimizer("Lion") == "lion"
    with pytest.raises(ValueError, match=r"^Invalid dtype: 'int8' \(choose from fp32, bf16, fp16, mixed\)$"):
        TrainSetup(dtype="int8")
    for bad in (-1, 2.5, True, "256"):
        with pytest.raises(ValueError, match="loss_chunk"):
            TrainSetup(loss_chunk=bad)


# ------------------------------------------------------------------------------ shape tensors
def test_tensors_of_a_layer_and_of_the_root_by_name_and_shape():
    shape = ModelShape(hidden_size=8, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=4, vocab_size=50, attention_bias=True, mlp_bias=True)  # fmt: skip
    assert shape.layer_tensors() == [
        ("q_proj", (16, 8)), ("k_proj", (8, 8)), ("v_proj", (8, 8)), ("o_proj", (8, 16)),
        ("gate_proj", (24, 8)), ("up_proj", (24, 8)), ("down_proj", (8, 24)),
        ("input_layernorm", (8,)), ("post_attention_layernorm", (8,)),
        ("q_bias", (16,)), ("k_bias", (8,)), ("v_bias", (8,)), ("o_bias", (8,)),
        ("gate_bias", (24,)), ("up_bias", (24,)), ("down_bias", (8,)),
    ]  # fmt: skip
    assert shape.root_tensors() == [("embed_tokens", (50, 8)), ("norm", (8,)), ("lm_head", (50, 8))]
    names = [n for n, _ in shape.tensors()]
    assert names[:2] == ["layers.0.q_proj", "layers.0.k_proj"] and names[16] == "layers.1.q_proj"
    assert names[-3:] == ["embed_tokens", "norm", "lm_head"] and shape.num_tensors == 2 * 16 + 3
    per_layer = 16 * 8 + 2 * 8 * 8 + 8 * 16 + 3 * 24 * 8 + 2 * 8 + (16 + 8 + 8 + 8) + (24 + 24 + 8)
    assert shape.layer_parameters == per_layer
    assert shape.parameters == 2 * per_layer + 2 * 50 * 8 + 8
    tied = ModelShape(hidden_size=8, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=4, vocab_size=50, tie_word_embeddings=True)  # fmt: skip
    assert tied.root_tensors() == [("embed_tokens", (50, 8)), ("norm", (8,))]
    assert tied.root_parameters == 50 * 8 + 8


# ------------------------------------------------------------------------------- sizes, table
def test_size_edges():
    assert parse_size("1") == 1 and parse_size("1.5") == 1
    with pytest.raises(ValueError, match=r"^invalid size 24: expected a number and a unit"):
        parse_size(24)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^invalid size '0.5': must be at least one byte$"):
        parse_size("0.5")
    unknown = r"^invalid size '3 XB': unknown unit 'XB' \(use GiB, GB, MiB or MB\)$"
    with pytest.raises(ValueError, match=unknown):
        parse_size("3 XB")
    assert format_bytes(GiB) == "1.00 GiB" and format_bytes(GiB - MiB) == "1023.0 MiB"
    assert format_bytes(-2 * GiB) == "-2.00 GiB"
    # digits that a divisor off by one in its last place would round the other way
    assert count_text(1e9) == "1.00 B" and count_text(1_015_000_001) == "1.02 B"
    assert count_text(999_999_999) == "1000.0 M" and count_text(1_050_001) == "1.1 M"


def test_the_table_lists_every_term_with_its_note_and_the_peak():
    shape = ModelShape(hidden_size=8, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=4, vocab_size=50, name="tiny")  # fmt: skip
    setup = TrainSetup(optimizer="adamw", seq_len=16, batch_size=2, dtype="mixed", grad_checkpointing=True,
                       accumulation_steps=4, world_size=2, strategy="fsdp")  # fmt: skip
    b = MemoryBreakdown(
        weights=GiB, gradients=3 * GiB // 2, optimizer_state=0, activations=MiB, logits=5 * GiB // 4,
        temporaries=0, overhead=GiB // 2, moment="optimizer step", shape=shape, setup=setup,
        notes={"weights": "w note", "logits": "l note", "overhead": "o note"},
    )  # fmt: skip
    assert b.format() == "\n".join([
        "Peak memory per device of one training step (estimate): tiny, "
        f"{count_text(shape.parameters)} params, "
        "adamw, mixed, seq 16 x batch 2, cpu, activation checkpointing, 4 accumulation steps, "
        "fsdp over 2 devices",
        "",
        "  component                 GiB  note",
        "  weights                 1.000  w note",
        "  gradients               1.500",
        "  optimizer state         0.000",
        "  activations             0.001",
        "  logits / loss           1.250  l note",
        "  temporaries             0.000",
        "  framework overhead      0.500  o note",
        "  -----------------------------",
        "  total (peak)            4.251  at: optimizer step",
        "",
        "  assumes: chunked loss (256 tokens per chunk); glibc's mmap threshold fixed, "
        "as `leantune train` sets it",
    ])  # fmt: skip
    cuda = TrainSetup(optimizer="adamw", device="cuda", loss_chunk=0)
    standard = MemoryBreakdown(**{**b.__dict__, "setup": cuda})
    assert standard.format().splitlines()[-1] == "  assumes: standard loss (full fp32 logits)"
    plain = MemoryBreakdown(**{**b.__dict__, "setup": TrainSetup(optimizer="adamw", accumulation_steps=2)})
    assert plain.format().splitlines()[0].endswith("seq 512 x batch 1, cpu, 2 accumulation steps")
    single = MemoryBreakdown(**{**b.__dict__, "setup": TrainSetup(optimizer="adamw")})
    assert single.format().splitlines()[0].endswith("seq 512 x batch 1, cpu")


# ---------------------------------------------------------------------- activations per token
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("padded_len", [None, 24])
def test_activation_bytes_per_token_term_by_term(dtype, padded_len):
    """The counts of ``activation_bytes_per_token``'s docstring, restated (``test_estimate.py``
    checks the same sums against what autograd saves)."""
    shape = ModelShape(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, vocab_size=96)  # fmt: skip
    s = {"fp32": 4, "bf16": 2, "mixed": 2}[dtype]
    h, i, q, kv = 64, 176, 64, 32
    attention = s * (q + q + kv + kv) + 4 * 4  # q, k (after RoPE), v, SDPA output; fp32 lse per head
    if padded_len:
        attention += s * (q - kv) * 2 + s * padded_len  # k/v repeated to all heads, the mask row
    mlp = s * i * 4
    if dtype == "mixed":
        norm = 4 * h + 4 * h + 4  # fp32 residual in, fp32 normalised, rsqrt
        layer = 2 * norm + 2 * h * (3 + 2) + attention + mlp  # bf16 casts for q/k/v and gate/up
        tail, residual = norm + 2 * h + 8 + 8, 4 * h
    else:
        norm = 4 * h + 4 + s * h + s * h  # fp32 input, rsqrt, normalised cast back, weight * x
        layer = 2 * norm + attention + mlp
        tail, residual = norm + 8 + 8, s * h
    assert activation_bytes_per_token(shape, dtype, padded_len=padded_len) == {
        "layer": layer, "tail": tail, "layer_input": residual,
    }  # fmt: skip


# --------------------------------------------------------------------------- the memory model
# Read from torch 2.13 and pytorch_optimizer: tensors of a parameter's size the per-tensor step
# allocates, and the devices where the step runs on all tensors at once (torch._foreach_*).
STEP_SCRATCH = {"adamw": 2, "adafactor": 1, "lion": 1, "adan": 1, "sgd": 0}
FOREACH = {"adamw": ("cuda",), "adafactor": ("cuda",), "lion": ("cpu", "cuda"), "adan": ("cpu", "cuda")}

def _ledger(shape: ModelShape, st: TrainSetup) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """Every moment's tensors, from the module docstring and the comments of ``estimate_memory``,
    for a shape without a config (the LLaMA formulas). Returns (total per moment, terms per moment)."""
    h, i, layers, vocab = shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.vocab_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    tokens, ranks = st.seq_len * st.batch_size, st.world_size
    mixed = st.dtype == "mixed"
    w = 4 if st.dtype in ("fp32", "mixed") else 2  # weights, gradients, state
    s = 4 if st.dtype == "fp32" else 2  # compute
    name = st.optimizer.removesuffix("_in_backward")
    in_backward = st.optimizer.endswith("_in_backward")
    fused = name in ("lomo", "adalomo", "floor") or in_backward
    sharded = st.strategy == "fsdp" and ranks > 1
    part = 1 / ranks if st.strategy == "fsdp" else 1.0

    mats = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    vecs = [(h,), (h,)] + ([(q,), (kv,), (kv,), (h,)] if shape.attention_bias else [])
    vecs += [(i,), (i,), (h,)] if shape.mlp_bias else []
    layer_params = sum(math.prod(m) for m in mats + vecs)
    root = [(vocab, h), (h,)] + ([] if shape.tie_word_embeddings else [(vocab, h)])
    every = mats * layers + vecs * layers + root
    params = sum(math.prod(t) for t in every)
    largest_layer = max(mats, key=math.prod)

    weights = params * w * part
    if sharded:  # two layers and the head (the root unit, when tied) gathered whole
        head = (vocab * h + h) if shape.tie_word_embeddings else vocab * h
        weights += (head + 2 * layer_params) * (2 if mixed else w) * (1 - 1 / ranks)
    linears = params - (0 if shape.tie_word_embeddings else vocab * h) - (2 * layers + 1) * h
    forward_weights = weights + (2 * linears if mixed and not sharded else 0)

    def chunk(t):  # whole rows, at most CHUNK_ELEMENTS
        cols = t[-1] if len(t) > 1 else 1
        return min(math.prod(t) // cols, max(1, CHUNK_ELEMENTS // cols)) * cols

    state = 0.0
    if name == "adamw":
        state = 2 * params * w * part
    elif name in ("lion", "adan"):
        state = (1 if name == "lion" else 4) * params * w * part
    elif name in ("adalomo", "adafactor"):
        b = 4 if name == "adalomo" else w
        state = sum((t[0] + t[1]) * b if len(t) == 2 else t[0] * b for t in every) * part
        if name == "adalomo":
            state += 4 * max(chunk(t) for t in every if len(t) == 2)  # one workspace

    grads = params * w * part
    acc = 0.0
    if st.accumulation_steps > 1 and name != "floor":
        acc = 4 * params * part if fused else grads
    buckets = grads if (st.strategy == "ddp" and ranks > 1 and not fused) else 0.0

    def update_scratch(t):  # besides the gradient itself
        if name == "floor":
            return 0
        n, c, low = math.prod(t), chunk(t), w < 4
        replicated = st.strategy == "ddp" and ranks > 1
        copied = (low or st.accumulation_steps > 1) and not replicated
        reduce_copy = 4 * n if replicated else 0
        if name == "lomo":
            return reduce_copy + (4 * c if copied else 0) + (4 * c if low else 0)
        if name == "adalomo":
            if len(t) == 1:
                return reduce_copy + (4 * c if copied else 0) + 2 * 4 * n
            a, b = (4 * c if copied else 0), (4 * c if low else 0)
            return reduce_copy + (a + b if c == n else max(a, b))
        times = 1 if st.device in FOREACH.get(name, ()) else STEP_SCRATCH[name]
        return int(reduce_copy + (4 * n if copied else 0) + (n * w if low else 0) + times * n * w)

    rope = 2 * st.seq_len * shape.head_dim * (4 if mixed else s)
    per = activation_bytes_per_token(shape, st.dtype, padded_len=st.seq_len if st.padded else None)
    layer_act, tail = tokens * per["layer"], tokens * per["tail"]
    if st.grad_checkpointing:
        mask = st.batch_size * st.seq_len**2 if st.padded else 0  # the boolean mask, an input of each
        kept = layers * tokens * per["layer_input"] + tail + rope + mask
        double = tokens * 4 * h if per["layer_input"] == 4 * h else 0  # fp32 stream saved once
        last = kept - tail + layer_act - double
    else:
        kept = layers * layer_act + tail + rope
        last = kept - tail
    overhead = (
        CPU_IMPORT_OVERHEAD + CPU_RUNTIME_OVERHEAD + int(6.5 * MiB) + 8 * KiB * len(every)
        if st.device == "cpu"
        else CUDA_CONTEXT_OVERHEAD
    )

    head_grad, tied = vocab * h * w, shape.tie_word_embeddings
    waiting = head_grad if (tied or not fused) else 0
    layer_grad = math.prod(largest_layer) * w
    unit_grads = layer_params * w if sharded else 0
    hidden_grad = s * tokens * h
    if st.loss_chunk:
        # leantune.loss.linear_cross_entropy, read off its forward: at the last chunk, the fp32
        # logits (the softmax, in place) with the bf16 product before or the bf16 gradient after
        # them (fp32: the logits are the product); the head's gradient in the compute dtype (+ its
        # fp32 cast under mixed); the hidden-state gradient, the chunk's hidden states, the nll of
        # every token; under mixed the bf16 copy of the fp32 head. Then its backward scales both
        # gradients in place: the head's gradient and the hidden-state gradient are all there is.
        c = min(st.loss_chunk, tokens)
        product = c * vocab * s if s == 2 else 0
        m: dict[str, dict[str, float]] = {
            "chunked loss": {"gradients": vocab * h * (6 if mixed else s), "activations": kept,
                             "logits": 4 * c * vocab + product,
                             "temporaries": hidden_grad + s * c * h + 4 * tokens + 2 * vocab * h * mixed},
            "lm_head backward": {"gradients": head_grad, "activations": kept, "temporaries": hidden_grad},
        }  # fmt: skip
    else:
        m = {
            "log-softmax backward": {"activations": kept, "logits": 12 * tokens * vocab},
            "lm_head backward": {"gradients": vocab * h * 6 if mixed else head_grad, "activations": kept,
                                 "logits": s * tokens * vocab, "temporaries": hidden_grad},  # fmt: skip
        }
    m |= {
        "last layer backward": {"gradients": waiting + (0 if fused else layer_grad) + unit_grads,
                                "activations": last, "temporaries": s * tokens * (h + 2 * i)},  # fmt: skip
    }
    if fused:
        if not tied:
            m["lm_head update"] = {"gradients": head_grad, "activations": kept,
                                   "temporaries": hidden_grad + update_scratch((vocab, h))}  # fmt: skip
        m["last layer update"] = {"gradients": waiting + layer_grad + unit_grads, "activations": last,
                                  "temporaries": hidden_grad + update_scratch(largest_layer)}  # fmt: skip
        if tied:
            last_buffer = 4 * vocab * h * part if acc else 0
            m["embedding update"] = {"weights": weights, "temporaries": update_scratch((vocab, h)),
                                     "gradients": head_grad + last_buffer}  # fmt: skip
    else:
        if st.device in FOREACH.get(name, ()):  # one list of temporaries as large as all tensors
            scratch = params * w * part
        else:
            scratch = STEP_SCRATCH[name] * max(math.prod(t) for t in every) * w
        m["optimizer step"] = {"weights": weights, "gradients": grads, "temporaries": scratch}
    totals = {}
    for moment, terms in m.items():
        terms.setdefault("weights", forward_weights)
        terms["gradients"] = terms.get("gradients", 0) + buckets
        terms["gradients"] += acc if moment not in ("optimizer step", "embedding update") else 0
        totals[moment] = int(sum(terms.values()) + state + overhead)
    return totals, m


SMALL = dict(hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
SHAPES = {
    "untied": ModelShape(**SMALL, vocab_size=1000),
    "tied-bias": ModelShape(**SMALL, vocab_size=1000, tie_word_embeddings=True, attention_bias=True,
                            mlp_bias=True),  # fmt: skip
    "wide-vocab": ModelShape(**SMALL, vocab_size=70000),  # lm_head over two update chunks
}
SETUPS = {
    "adalomo-bf16": dict(optimizer="adalomo"),
    "adalomo-fp32-accum": dict(optimizer="adalomo", dtype="fp32", accumulation_steps=2),
    "adalomo-mixed-ckpt": dict(optimizer="adalomo", dtype="mixed", grad_checkpointing=True),
    "adalomo-fp32-ckpt-padded": dict(optimizer="adalomo", dtype="fp32", grad_checkpointing=True, padded=True),
    "lomo-bf16-accum": dict(optimizer="lomo", accumulation_steps=4),
    "lomo-fp32-ddp": dict(optimizer="lomo", dtype="fp32", world_size=2, strategy="ddp"),
    "adalomo-bf16-ddp": dict(optimizer="adalomo", world_size=4, strategy="ddp"),
    "adalomo-fsdp4": dict(optimizer="adalomo", world_size=4, strategy="fsdp"),
    "adalomo-mixed-fsdp2-accum": dict(optimizer="adalomo", dtype="mixed", world_size=2, strategy="fsdp",
                                      accumulation_steps=2),  # fmt: skip
    "fsdp-one-rank": dict(optimizer="adamw", world_size=1, strategy="fsdp"),
    "adamw-bf16": dict(optimizer="adamw"),
    "adamw-fp32-accum-ddp2": dict(optimizer="adamw", dtype="fp32", accumulation_steps=2, world_size=2,
                                  strategy="ddp"),  # fmt: skip
    "adamw-mixed-cuda-fsdp2": dict(optimizer="adamw", dtype="mixed", device="cuda", world_size=2,
                                   strategy="fsdp"),  # fmt: skip
    "adamw-in-backward-bf16-accum": dict(optimizer="adamw_in_backward", accumulation_steps=2),
    "adamw-in-backward-fp32-cuda": dict(optimizer="adamw_in_backward", dtype="fp32", device="cuda"),
    "adafactor-fp32": dict(optimizer="adafactor", dtype="fp32"),
    "adafactor-in-backward-ddp2": dict(optimizer="adafactor_in_backward", world_size=2, strategy="ddp"),
    "lion-bf16": dict(optimizer="lion"),
    "adan-fp16-in-backward": dict(optimizer="adan_in_backward", dtype="fp16"),
    "sgd-fp32-ckpt": dict(optimizer="sgd", dtype="fp32", grad_checkpointing=True),
    "sgd-cuda-ddp2": dict(optimizer="sgd", device="cuda", world_size=2, strategy="ddp"),
    "lion-cuda": dict(optimizer="lion", device="cuda"),
    "floor-mixed": dict(optimizer="floor", dtype="mixed"),
    "floor-accum": dict(optimizer="floor", accumulation_steps=2),
}


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("setup_id", list(SETUPS))
@pytest.mark.parametrize("tokens", [(32, 2), (1, 1)], ids=["seq32x2", "seq1"])
@pytest.mark.parametrize("loss_chunk", [0, 24, 256], ids=["standard-loss", "chunk24", "chunk256"])
def test_every_moment_equals_the_ledger(shape_id, setup_id, tokens, loss_chunk):
    shape = SHAPES[shape_id]
    setup = TrainSetup(**SETUPS[setup_id], seq_len=tokens[0], batch_size=tokens[1], loss_chunk=loss_chunk)
    b = estimate_memory(shape, setup)
    totals, terms = _ledger(shape, setup)
    assert b.moments == totals
    peak = max(totals, key=totals.__getitem__)
    assert b.moment == peak
    expected = {k: int(terms[peak].get(k, 0)) for k in ("weights", "gradients", "activations", "logits")}
    expected["temporaries"] = int(terms[peak].get("temporaries", 0))
    assert {k: getattr(b, k) for k in expected} == expected
    assert b.total == totals[peak]


def test_notes_say_where_each_term_comes_from():
    shape = SHAPES["untied"]

    def notes(**setup):
        return estimate_memory(shape, TrainSetup(**{"loss_chunk": 0, **setup})).notes

    n = notes(optimizer="adalomo", dtype="bf16", seq_len=2048)
    assert n["weights"] == f"{count_text(shape.parameters)} params x 2 B"
    assert n["optimizer_state"] == "row + column fp32 statistics + a chunk workspace"
    assert n["gradients"] == "one tensor at a time"
    layer = 2048 * activation_bytes_per_token(shape, "bf16")["layer"]
    assert n["activations"] == f"3 layers x {format_bytes(layer)}"
    assert n["logits"] == "2048 tokens x 1000 vocab, fp32 for the loss (train.loss_chunk=0)"
    chunked = notes(optimizer="adalomo", dtype="bf16", seq_len=2048, loss_chunk=256)["logits"]
    assert chunked == "one chunk: 256 of 2048 tokens x 1000 vocab (train.loss_chunk)"
    assert n["model"] == "parameters and activations from the LLaMA formulas"
    assert n["overhead"] == "python + torch + transformers, model objects, first-step scratch"
    assert n["temporaries"] == "none alive at this moment"  # the peak: log-softmax backward
    assert notes(optimizer="adalomo", seq_len=1)["activations"] == ""  # under a MiB: no note
    assert notes(optimizer="lomo", accumulation_steps=2)["gradients"] == (
        "fp32 accumulation buffers + one tensor at a time"
    )
    assert notes(optimizer="lomo")["optimizer_state"] == "no state"
    fsdp = notes(optimizer="adamw", world_size=4, strategy="fsdp")
    params = count_text(shape.parameters)
    assert fsdp["weights"] == f"{params} params x 2 B / 4 ranks + 2 layers and the head unsharded"
    ddp = notes(optimizer="adamw", world_size=2, strategy="ddp")
    assert ddp["gradients"] == "all of them at step() + DDP buckets"
    assert notes(optimizer="adamw")["gradients"] == "all of them at step()"
    assert notes(optimizer="adamw", device="cuda")["overhead"] == "CUDA context (a guess)"
    mixed = notes(optimizer="adalomo", dtype="mixed", grad_checkpointing=True, seq_len=4096)
    assert mixed["weights"] == f"{count_text(shape.parameters)} params x 4 B + bf16 autocast copies"
    assert mixed["activations"] == "3 layer inputs (checkpointing) + 1 layer recomputed"


def test_notes_of_a_model_counted_on_its_own_code():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    shape = ModelShape.from_hf_config(cfg.to_dict())
    n = estimate_memory(shape, TrainSetup(optimizer="adalomo", seq_len=4096)).notes
    own = "parameters and activations counted on the family's own modelling code (fake tensors)"
    assert n["model"] == own
    assert n["activations"].startswith("2 layers x ") and n["activations"].endswith(
        ", counted on the family's own code"
    )
