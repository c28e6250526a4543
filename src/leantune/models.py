"""Model construction: LLaMA-shaped size presets (random init) and local Hugging Face directories.

Presets give the *shape* of well-known models so that from-scratch runs, benchmarks and the memory
estimator can use them without any download. Weights of a preset are always randomly initialised.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "PRESETS",
    "Preset",
    "ATTN_IMPLEMENTATIONS",
    "approx_parameters",
    "build_model",
    "resolve_attention",
    "check_model_dir",
    "count_parameters",
    "get_rope_theta",
    "human_count",
    "preset_config",
    "resolve_dtype",
    "set_rope_scaling",
    "set_rope_theta",
]

# Presets larger than this are initialised directly in a low-precision weight dtype (see build_model).
LOW_PRECISION_INIT_PARAMS = 1_000_000_000

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What model.attn_implementation may be: auto = sdpa where the family has it, else eager.
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")


@dataclass(frozen=True)
class Preset:
    """A LLaMA shape. ``vocab_size`` is replaced by the tokenizer's when they differ."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    note: str = ""


PRESETS: dict[str, Preset] = {
    # The built-in default job's model: small enough to learn the built-in tasks in ~2 CPU minutes.
    "tiny": Preset(
        128,
        384,
        4,
        4,
        2,
        128,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        note="default job (~0.9 M params with the built-in tokenizer)",
    ),
    "test": Preset(32, 64, 2, 4, 2, 64, max_position_embeddings=256, note="unit tests"),
    "0.1b": Preset(768, 2048, 12, 12, 12, 32000, note="GPT-2-small-sized LLaMA, ~134 M"),
    "0.37b": Preset(1024, 2816, 24, 16, 16, 32000, note="~374 M, the optimizer benchmark shape"),
    "0.5b": Preset(1280, 3456, 24, 20, 20, 32000, note="~557 M"),
    "1b": Preset(2048, 5632, 22, 32, 4, 32000, note="TinyLlama-1.1B shape"),
    "1b-l3": Preset(
        2048,
        8192,
        16,
        32,
        8,
        128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        note="Llama-3.2-1B shape (128K vocabulary, tied)",
    ),
    "3b": Preset(
        3072,
        8192,
        28,
        24,
        8,
        128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        note="Llama-3.2-3B shape",
    ),
    "7b": Preset(4096, 11008, 32, 32, 32, 32000, note="Llama-2-7B shape"),
    "8b": Preset(
        4096,
        14336,
        32,
        32,
        8,
        128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        note="Llama-3-8B shape",
    ),
    "13b": Preset(5120, 13824, 40, 40, 40, 32000, note="Llama-2-13B shape"),
    "70b": Preset(8192, 28672, 80, 64, 8, 32000, note="Llama-2-70B shape"),
}


def _unknown_preset(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown model preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}")


def preset_config(name: str, *, vocab_size: int | None = None, **overrides: Any):
    """A ``transformers.LlamaConfig`` for a preset.

    Args:
        name: a key of :data:`PRESETS`.
        vocab_size: replaces the preset's vocabulary size (e.g. the tokenizer's).
        **overrides: any other ``LlamaConfig`` field (e.g. ``rope_theta``, ``max_position_embeddings``).
    """
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise _unknown_preset(name)
    p = PRESETS[name]
    fields = {
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "vocab_size": vocab_size if vocab_size is not None else p.vocab_size,
        "tie_word_embeddings": p.tie_word_embeddings,
        "max_position_embeddings": p.max_position_embeddings,
        "rope_theta": p.rope_theta,
    }
    fields.update(overrides)
    rope_theta = fields.pop("rope_theta")
    cfg = LlamaConfig(**fields)
    set_rope_theta(cfg, rope_theta)
    return cfg


def set_rope_theta(config: Any, theta: float) -> None:
    """Set the rotary base on a transformers config (v4 ``rope_theta`` or v5 ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = float(theta)
    if hasattr(config, "rope_theta") or not isinstance(params, dict):
        config.rope_theta = float(theta)


def set_rope_scaling(config: Any, scaling: dict[str, Any]) -> None:
    """Set the RoPE scaling options (``rope_type`` and its fields) on a transformers config.

    transformers 5 keeps ``rope_type``, its options *and* ``rope_theta`` in one
    ``config.rope_parameters`` dict, and its deprecated ``rope_scaling`` setter replaces that dict
    whole, dropping the base (the model then fails with ``None ** tensor``). Here the options
    replace the previous scaling but the rotary base is kept unless ``scaling`` sets
    ``rope_theta`` itself. transformers 4 has a separate ``rope_scaling`` field, set as given.

    Args:
        config: a transformers model config.
        scaling: e.g. ``{"rope_type": "linear", "factor": 2.0}`` (the v4 key ``type`` is accepted).

    Raises:
        ValueError: ``scaling`` is not a dict, names no or an unknown ``rope_type``, or lacks a
            field that type requires (e.g. ``factor``).
    """
    if not isinstance(scaling, dict):
        raise ValueError(
            f"rope_scaling must be a dict like {{rope_type: linear, factor: 2.0}}, got {scaling!r}"
        )
    new = dict(scaling)
    if "type" in new:
        new.setdefault("rope_type", new.pop("type"))
    if "rope_type" not in new:
        raise ValueError(
            f"rope_scaling needs a rope_type (e.g. linear, dynamic, yarn, llama3), got {scaling!r}"
        )
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):  # transformers 4
        config.rope_scaling = new
        return
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    known = {"default", *ROPE_INIT_FUNCTIONS}
    if new["rope_type"] not in known:
        raise ValueError(
            f"rope_scaling: unknown rope_type {new['rope_type']!r}; known: {', '.join(sorted(known))}"
        )
    new.setdefault("rope_theta", get_rope_theta(config))
    config.rope_parameters = new
    # Fill type-specific defaults (e.g. original_max_position_embeddings for yarn/llama3) and check
    # the required fields now rather than when the rotary embedding is built.
    config.standardize_rope_params()
    try:
        config.validate_rope()
    except KeyError as err:
        raise ValueError(f"rope_scaling: {err.args[0] if err.args else err}") from None


def get_rope_theta(config: Any) -> float:
    """The rotary base of a transformers config."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def resolve_dtype(name: str) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (also ``float32`` ...) to a torch dtype."""
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_model_dir(path: str | Path, what: str = "model.path") -> Path:
    """``path`` as a Path if it is a Hugging Face model directory with safetensors weights.

    Args:
        path: the directory.
        what: how error messages name it (the config key, by default).

    Raises:
        FileNotFoundError: no such directory, no ``config.json``, or no ``*.safetensors`` weights
            (``.bin``/``.pt`` weights are pickles, which can run code when loaded: never read).
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        state = "has no config.json" if root.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{what} {str(root)!r} {state}: give a local Hugging Face model directory "
            "(config.json + *.safetensors weights)"
            + (", or unset it to train a model.preset from scratch" if what == "model.path" else "")
        )
    if not any(root.glob("*.safetensors")):
        pickled = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise FileNotFoundError(
            f"{what} {str(root)!r} has no *.safetensors weights"
            + (f" (found {', '.join(pickled[:3])})" if pickled else "")
            + ": leantune reads weights only from safetensors, because .bin/.pt files are pickles that "
            "can run code when loaded. Convert them once where you trust the file, e.g. "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
        )
    return root


def _causal_lm_class(config: Any) -> type | None:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None


def resolve_attention(config: Any, requested: str | None) -> str | None:
    """The attention kernel to build a model of ``config`` with.

    ``auto`` is ``sdpa`` when the family's model class supports it (transformers'
    ``_supports_sdpa``), else ``eager``; ``None`` leaves it to transformers.

    Raises:
        ValueError: an unknown name, or ``sdpa`` for a family that does not support it.
    """
    if requested is None:
        return None
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {requested!r}: use {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if requested == "eager":
        return "eager"
    cls = _causal_lm_class(config)
    supported = bool(getattr(cls, "_supports_sdpa", False)) if cls is not None else True
    if requested == "auto":
        return "sdpa" if supported else "eager"
    if not supported:
        name = cls.__name__ if cls is not None else type(config).__name__
        raise ValueError(
            f"attn_implementation=sdpa: {name} ({config.model_type}) has no sdpa attention in "
            "transformers; use model.attn_implementation=auto or eager"
        )
    return "sdpa"


def build_model(
    *,
    preset: str | None = None,
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """A causal LM from a preset (random init, seeded) or a local Hugging Face directory.

    Args:
        preset: a key of :data:`PRESETS` (exclusive with ``path``).
        path: a local directory with ``config.json`` and safetensors weights.
        dtype: weight dtype.
        vocab_size: vocabulary size for a preset (the tokenizer's).
        seed: seed of the random initialisation of a preset.
        trust_remote_code: allow custom modelling code from ``path`` (off unless set).
        attn_implementation: ``"auto"``, ``"sdpa"`` or ``"eager"`` (see :func:`resolve_attention`;
            default: transformers' choice).
        config_overrides: config fields to override (e.g. ``rope_theta``, ``rope_scaling``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if (preset is None) == (path is None):
        raise ValueError("give exactly one of a model preset or a model path")
    overrides = dict(config_overrides or {})
    theta = overrides.pop("rope_theta", None)
    scaling = overrides.pop("rope_scaling", None)
    if preset is not None:
        cfg = preset_config(preset, vocab_size=vocab_size, **overrides)
        if scaling is not None:
            set_rope_scaling(cfg, scaling)
        if theta is not None:
            set_rope_theta(cfg, theta)
        attn = resolve_attention(cfg, attn_implementation)
        if attn:
            cfg._attn_implementation = attn
        # Seeded init on CPU in fp32, then cast: the same seed gives the same model in every dtype.
        # Above LOW_PRECISION_INIT_PARAMS a transient fp32 copy (4 bytes per parameter: 32 GB for
        # an 8B model) would dwarf the training step itself, so large presets are initialised
        # directly in their weight dtype (deterministic per seed and dtype).
        direct = dtype != torch.float32 and approx_parameters(preset, vocab_size) > LOW_PRECISION_INIT_PARAMS
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if direct:
                previous = torch.get_default_dtype()
                torch.set_default_dtype(dtype)
                try:
                    model = LlamaForCausalLM(cfg)
                finally:
                    torch.set_default_dtype(previous)
            else:
                model = LlamaForCausalLM(cfg)
        return model.to(dtype)
    root = check_model_dir(path)
    cfg = AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if scaling is not None:
        set_rope_scaling(cfg, scaling)
    if theta is not None:
        set_rope_theta(cfg, theta)
    attn = resolve_attention(cfg, attn_implementation)
    extra = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(
        root,
        config=cfg,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        use_safetensors=True,
        **extra,
    )


def approx_parameters(name: str, vocab_size: int | None = None) -> int:
    """Parameter count of a preset, computed from its shape (no model is built)."""
    if name not in PRESETS:
        raise _unknown_preset(name)
    p = PRESETS[name]
    v = vocab_size if vocab_size is not None else p.vocab_size
    head_dim = p.hidden_size // p.num_attention_heads
    kv = p.num_key_value_heads * head_dim
    attn = 2 * p.hidden_size * p.hidden_size + 2 * p.hidden_size * kv
    mlp = 3 * p.hidden_size * p.intermediate_size
    per_layer = attn + mlp + 2 * p.hidden_size
    embed = v * p.hidden_size * (1 if p.tie_word_embeddings else 2)
    return p.num_hidden_layers * per_layer + embed + p.hidden_size


def human_count(n: int) -> str:
    """``1234567`` -> ``"1.23 M"``."""
    if n < 1000:
        return str(n)
    exp = min(4, int(math.log10(n) // 3))
    return f"{n / 1000**exp:.3g} {' KMBT'[exp]}"
