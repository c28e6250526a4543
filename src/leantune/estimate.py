"""Peak memory of one training step, predicted from the model's shape before anything runs.

Memory at any moment of a step is the sum of the tensors alive at that moment. The estimate
evaluates the moments where the peak can happen and reports the largest, split into

* **weights**: the parameters; under ``mixed`` also autocast's bf16 copies of the linear weights
  (each linear saves its copy for backward); under FSDP the local shard plus the unsharded units;
* **gradients**: ordinary optimizers hold all of them at ``step()``; optimizers fused into backward
  hold one at a time (the largest is ``lm_head``/the embedding); plus accumulation buffers;
* **optimizer state**: AdamW two moments, AdaLomo row + column fp32 vectors, ...;
* **activations**: what autograd saves for backward in transformers' LLaMA with SDPA attention,
  counted tensor by tensor (:func:`activation_bytes_per_token`);
* **logits / loss**: ``ForCausalLMLoss`` upcasts the logits to fp32; ``cross_entropy`` saves the
  fp32 log-probabilities and its backward holds three ``tokens x vocab`` fp32 tensors at once
  (saved log-probs, NLL gradient, log-softmax gradient): the peak of most configurations;
* **temporaries**: fp32 chunk copies of the fused updates, ``step()`` scratch of ordinary
  optimizers, gradients of the activations of the layer being back-propagated;
* **framework overhead**: on CPU the resident size of a process that imported torch, transformers'
  LLaMA and leantune, plus what building the model and the first step leave behind (measured); on
  CUDA a guessed CUDA-context size.

Moments: the log-softmax backward; the ``lm_head`` backward and (fused) its update; the backward
of the last decoder layer (with checkpointing: after recomputing it) and (fused) the update of its
largest weight; (tied, fused) the embedding update at the end of backward; (ordinary)
``optimizer.step()``.

Assumptions: a LLaMA-shaped decoder (``LlamaForCausalLM`` or a config with its field names); SDPA
without a padding mask (packed or equal-length sequences: no ``L x L`` mask, grouped-query
attention without repeated k/v); the loop drops the model output before backward
(``loss = model(**batch).loss``); leantune's optimizer defaults (rounding ``"nearest"``, no
gradient-norm clipping or loss scaling, which would add a measuring backward; SGD without
momentum). ``fp16`` is modelled like ``bf16``.

Validation: ``benchmarks/estimate_validation.py`` compares the CPU estimate with measured peak RSS
(``benchmarks/results/estimate_validation.md``). It assumes glibc's mmap threshold is fixed
(``MALLOC_MMAP_THRESHOLD_=65536``): by default glibc raises the threshold to the largest freed
block (up to 32 MiB) and then keeps freed tensors of up to that size in its heap, so RSS runs
~10% above live memory. CUDA constants, ``foreach`` scratch on CUDA and the DDP/FSDP terms are
read from the libraries' code, not validated on hardware.

Tensor and pipeline parallelism (``TrainSetup.tp``, ``pp``): each device holds a part of the model
(:class:`_Part`: its stage's layers, ``1/tp`` of their attention and MLP matrices) and the estimate
is the heaviest stage's; :func:`communication_per_step` says what one device sends per step. The
parts' parameters equal a real DTensor split and the pipeline's stage modules
(``tests/unit/test_estimate_parallel.py``); the rest is read from torch's code, not measured.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "CHUNK_ELEMENTS",
    "CPU_IMPORT_OVERHEAD",
    "CPU_RUNTIME_OVERHEAD",
    "CUDA_CONTEXT_OVERHEAD",
    "DTYPE_MODES",
    "MemoryBreakdown",
    "ModelShape",
    "STRATEGIES",
    "TrainSetup",
    "activation_bytes_per_token",
    "canonical_optimizer",
    "communication_per_step",
    "estimate_memory",
    "estimator_optimizers",
    "format_bytes",
    "parse_size",
]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# VmRSS of a process after ``import torch, transformers; from transformers import LlamaForCausalLM;
# import leantune.optim`` (torch 2.13 CPU, transformers 5.x, Python 3.11; LlamaForCausalLM alone is
# ~95 MiB because transformers imports lazily).
CPU_IMPORT_OVERHEAD = 336 * MiB
# What the training steps leave resident once every tensor but the optimizer state is freed (oneDNN
# primitive caches and scratch, OpenMP thread stacks, the autograd engine): 19-31 MiB over the
# configurations of the validation benchmark (its ``runtime_overhead``), median 26-27.5 MiB.
CPU_RUNTIME_OVERHEAD = 26 * MiB
# What building a model leaves besides its weights (modules transformers imports on the first
# construction, Python objects of modules and parameters): 7.4 MiB for the 0.1b preset (111 tensors),
# 8.2 MiB for 0.37b (219): ~6.5 MiB + 8 KiB per parameter tensor.
_MODEL_BUILD_OVERHEAD = int(6.5 * MiB)
_PER_TENSOR_OVERHEAD = 8 * KiB
# A guess, not measured here: a CUDA context with cuBLAS/cuDNN loaded takes 300-600 MiB of device
# memory depending on GPU and library versions, plus cuBLAS workspaces.
CUDA_CONTEXT_OVERHEAD = 512 * MiB

# leantune.optim.engine.DEFAULT_CHUNK_ELEMENTS, repeated so that this module imports without torch
# (a unit test keeps them equal).
CHUNK_ELEMENTS = 1 << 22

DTYPE_MODES = ("fp32", "bf16", "fp16", "mixed")
STRATEGIES = ("none", "ddp", "fsdp")
SCHEDULES = ("1f1b", "gpipe")
DEVICES = ("cpu", "cuda")
_WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "mixed": 4}  # also gradients and state
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "mixed": 2}  # activations
_IN_BACKWARD = "_in_backward"
FLOOR = "floor"


# ------------------------------------------------------------------------------------------ sizes
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS |= {_p: 1024**_i, f"{_p}ib": 1024**_i, f"{_p}b": 1000**_i}


def parse_size(text: str) -> int:
    """A memory size in bytes: ``"24GiB"``, ``"24 GB"``, ``"512MiB"``, ``"1.5gib"``, ``"1024"``.

    Binary units (KiB, MiB, GiB, TiB and the bare K, M, G, T) are powers of 1024, decimal ones (KB,
    MB, GB, TB) powers of 1000; case-insensitive.

    Raises:
        ValueError: empty, negative, zero or unparseable sizes and unknown units.
    """
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number and a unit, e.g. '24GiB' or '512MB'")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"invalid size {text!r}: unknown unit {unit!r} (use GiB, GB, MiB or MB)")
    value = float(number) * factor
    if value < 1:
        raise ValueError(f"invalid size {text!r}: must be at least one byte")
    return int(value)


def format_bytes(n: float) -> str:
    """``1610612736`` -> ``"1.50 GiB"`` (MiB below 1 GiB)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


# ------------------------------------------------------------------------------------ model shape
@dataclass(frozen=True)
class ModelShape:
    """The shape of a LLaMA-style decoder: everything the estimate needs, no weights.

    Attributes:
        hidden_size: model width ``h``.
        intermediate_size: MLP width (gate/up/down projections).
        num_layers: decoder layers.
        num_heads: attention (query) heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than ``num_heads``).
        head_dim: width of one head.
        vocab_size: rows of the embedding and of ``lm_head``.
        tie_word_embeddings: ``lm_head`` shares the embedding matrix.
        attention_bias: q/k/v/o projections have biases (Qwen2-style).
        mlp_bias: MLP projections have biases.
        name: where the shape came from (preset name or directory), for display.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = "custom"
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The model's ``config.json`` when transformers knows its family: parameters and activations
    then come from the family's own modelling code (:mod:`leantune.footprint`), not the LLaMA
    formulas below."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check_int(key, getattr(self, key))
        _check_int("head_dim", self.head_dim)
        _check_int("vocab_size", self.vocab_size)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @classmethod
    def from_preset(cls, name: str, *, vocab_size: int | None = None) -> ModelShape:
        """The shape of a :data:`leantune.models.PRESETS` entry.

        Raises:
            ValueError: unknown preset (the message suggests the closest name).
        """
        from leantune.models import PRESETS  # imports torch, so only when a preset is asked for

        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown model preset {name!r}.{hint} Known presets: {', '.join(PRESETS)} "
                "(or give a local Hugging Face model directory)"
            )
        p = PRESETS[name]
        return cls(
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_layers=p.num_hidden_layers,
            num_heads=p.num_attention_heads,
            num_kv_heads=p.num_key_value_heads,
            head_dim=p.hidden_size // p.num_attention_heads,
            vocab_size=vocab_size if vocab_size is not None else p.vocab_size,
            tie_word_embeddings=p.tie_word_embeddings,
            name=name,
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], *, name: str = "custom") -> ModelShape:
        """The shape described by a parsed Hugging Face ``config.json``.

        LLaMA field names (Mistral, Qwen2, ... use the same). ``num_key_value_heads`` defaults to
        ``num_attention_heads``, ``head_dim`` (absent or ``null`` in many configs) to
        ``hidden_size // num_attention_heads``, ``tie_word_embeddings`` to false (LlamaConfig's
        default). RoPE settings (v4 ``rope_theta``, v5 ``rope_parameters``) do not change memory.
        A multimodal config's ``text_config`` is used when the top level has no ``hidden_size``.

        Raises:
            ValueError: a required field is missing or invalid.
        """
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        known = _transformers_config(config)
        if known is not None:
            return cls._from_transformers(config, known, name)
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [k for k in required if config.get(k) is None]
        if missing:
            raise ValueError(f"{name}: config.json has no {', '.join(missing)} (not a decoder LM config?)")
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            name=name,
        )

    @classmethod
    def _from_transformers(cls, config: dict[str, Any], cfg: Any, name: str) -> ModelShape:
        """A family transformers knows: its config's attributes (``attribute_map`` reads GPT-2's
        ``n_embd`` as ``hidden_size``), the parameters and widths of its fake model."""
        if not getattr(cfg, "num_attention_heads", None):  # e.g. Mamba: no attention to count
            raise ValueError(
                f"{name}: a {cfg.model_type} config has no num_attention_heads; the estimate counts "
                "transformer decoders (attention and feed-forward blocks)"
            )
        try:
            fp = _params_footprint(json.dumps(config, sort_keys=True))
        except Exception as err:  # any failure of the family's own constructor, said plainly
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{name}: transformers cannot build a causal LM ({cfg.model_type}) from this "
                f"config.json: {first}"
            ) from None
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or heads
        if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
            kv = 1
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=max(1, fp.ffn_width),
            num_layers=len(fp.layers),
            num_heads=heads,
            num_kv_heads=kv if heads % kv == 0 else heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            name=name,
            config=dict(config),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelShape:
        """The shape of a local Hugging Face model directory (reads ``config.json`` only).

        Raises:
            FileNotFoundError: no such directory, or no ``config.json`` in it.
            ValueError: ``config.json`` is not JSON or not a decoder LM config.
        """
        try:
            root = Path(path).expanduser()
        except RuntimeError:  # "~nosuchuser/...": no such home directory
            root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"model directory {str(path)!r} has no config.json: give a local Hugging Face model "
                "directory or a preset name"
            )
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{cfg_path}: not valid JSON ({err})") from err
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")
        return cls.from_hf_config(config, name=str(path))

    @classmethod
    def resolve(cls, spec: str) -> ModelShape:
        """A preset name or a local Hugging Face directory, whichever ``spec`` is.

        ``spec`` is a directory when it contains a path separator, starts with ``.`` or ``~``, or
        names an existing directory; otherwise a preset name.
        """
        if "/" in spec or "\\" in spec or spec.startswith((".", "~")) or Path(spec).is_dir():
            return cls.from_hf_dir(spec)
        return cls.from_preset(spec)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def footprint(self, dtype: str = "fp32", padded: bool = False) -> Any:
        """The :class:`leantune.footprint.ModelFootprint` of ``config`` (``None`` without one)."""
        if self.config is None:
            return None
        return _footprint(json.dumps(self.config, sort_keys=True), dtype, padded)

    def layer_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of one decoder layer's parameters (linear weights are ``out x in``);
        for a model read from its config, the largest layer's."""
        if self.config is not None:
            fp = self.footprint()
            return list(max(fp.layers, key=_layer_numel).params)
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        out = [
            ("q_proj", (q, h)),
            ("k_proj", (kv, h)),
            ("v_proj", (kv, h)),
            ("o_proj", (h, q)),
            ("gate_proj", (i, h)),
            ("up_proj", (i, h)),
            ("down_proj", (h, i)),
            ("input_layernorm", (h,)),
            ("post_attention_layernorm", (h,)),
        ]
        if self.attention_bias:
            out += [("q_bias", (q,)), ("k_bias", (kv,)), ("v_bias", (kv,)), ("o_bias", (h,))]
        if self.mlp_bias:
            out += [("gate_bias", (i,)), ("up_bias", (i,)), ("down_bias", (h,))]
        return out

    def root_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Parameters outside the layers: embedding, final norm and ``lm_head`` (if untied)."""
        if self.config is not None:
            return list(self.footprint().root_params)
        out = [("embed_tokens", (self.vocab_size, self.hidden_size)), ("norm", (self.hidden_size,))]
        if not self.tie_word_embeddings:
            out.append(("lm_head", (self.vocab_size, self.hidden_size)))
        return out

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter tensor (a tied matrix once); layer tensors are prefixed ``layers.N.``."""
        if self.config is not None:
            fp = self.footprint()
            layers = [(f"layers.{i}.{n}", s) for i, layer in enumerate(fp.layers) for n, s in layer.params]
            return layers + self.root_tensors()
        layers = [(f"layers.{n}.{k}", s) for n in range(self.num_layers) for k, s in self.layer_tensors()]
        return layers + self.root_tensors()

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer (the largest, when layers differ)."""
        return sum(math.prod(s) for _, s in self.layer_tensors())

    @property
    def root_parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.root_tensors())

    @property
    def parameters(self) -> int:
        """Distinct parameter elements (a tied matrix counted once)."""
        if self.config is not None:
            return sum(math.prod(s) for _, s in self.tensors())
        return self.num_layers * self.layer_parameters + self.root_parameters

    @property
    def num_tensors(self) -> int:
        if self.config is not None:
            return len(self.tensors())
        return self.num_layers * len(self.layer_tensors()) + len(self.root_tensors())

    def cast_parameters(self) -> int:
        """Elements that bf16 autocast copies in forward (every linear weight, the head too)."""
        if self.config is not None:
            return self.footprint().cast_numel
        linear = self.parameters - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)
        return linear - (2 * self.num_layers + 1) * self.hidden_size  # the norms are not cast


def _layer_numel(layer: Any) -> int:
    return sum(math.prod(s) for _, s in layer.params)


def _transformers_config(config: dict[str, Any]) -> Any:
    """The transformers config of a ``config.json`` whose family transformers knows, else None."""
    model_type = config.get("model_type")
    if not model_type:
        return None
    try:
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if model_type not in CONFIG_MAPPING:
        return None
    data = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **data)
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=32)
def _footprint(config_json: str, dtype: str, padded: bool) -> Any:
    from leantune.footprint import model_footprint

    return model_footprint(json.loads(config_json), dtype, padded=padded)


@functools.lru_cache(maxsize=32)
def _params_footprint(config_json: str) -> Any:
    return _footprint(config_json, "fp32", False)


def _check_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {key}: {value!r} (must be an int >= 1)")


# ------------------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class _OptimModel:
    """How one optimizer uses memory.

    ``state``: ``"none"``, ``"moments"`` (``moments`` tensors shaped and typed like the parameter),
    ``"factored"`` (row + column vectors per matrix, the full tensor for vectors, parameter dtype)
    or ``"factored_fp32"`` (the same in fp32). ``step_scratch``: tensors of a parameter's size that
    the per-tensor implementation allocates while stepping it; on ``foreach_devices`` the
    implementation steps all tensors at once, with one list of temporaries as large as all of them.
    """

    state: str
    moments: int = 0
    fused: bool = False
    step_scratch: int = 0
    foreach_devices: tuple[str, ...] = ()
    note: str = ""


# Read from the implementations: torch 2.13 ``_single_tensor_adam`` computes
# ``(exp_avg_sq.sqrt() / bc).add_(eps)`` (two temporaries alive at once), ``_multi_tensor_adam`` one
# list of square roots; ``_single_tensor_adafactor`` one ``row_var @ col_var`` estimate; SGD without
# momentum updates in place; pytorch_optimizer's Lion and Adan use ``torch._foreach_*`` on CPU too
# (``can_use_foreach`` only asks for dense real gradients): one list of updates / denominators.
_CUDA = ("cuda",)
_OPTIMIZERS: dict[str, _OptimModel] = {
    "adalomo": _OptimModel("factored_fp32", fused=True, note="row + column fp32 statistics"),
    "lomo": _OptimModel("none", fused=True, note="no state"),
    "adamw": _OptimModel("moments", 2, step_scratch=2, foreach_devices=_CUDA, note="2 moments"),
    "sgd": _OptimModel("none", note="no momentum: no state"),
    "adafactor": _OptimModel(
        "factored", step_scratch=1, foreach_devices=_CUDA, note="row + column statistics"
    ),
    "lion": _OptimModel("moments", 1, step_scratch=1, foreach_devices=DEVICES, note="1 moment"),
    "adan": _OptimModel(
        "moments", 4, step_scratch=1, foreach_devices=DEVICES, note="3 moments + last gradient"
    ),
}
_ALREADY_FUSED = ("adalomo", "lomo")
# leantune.optim.competitors: their memory depends on each package's internals (quantisation
# blocks, projector storage, BAdam's fp32 block copy), so benchmarks/competitors.py measures it.
_MEASURED_ONLY = ("galore", "apollo", "adam_mini", "badam", "adamw8bit", "adamw4bit")


def estimator_optimizers() -> list[str]:
    """Optimizer names the estimate models: leantune's except Sophia and the competitors from other
    packages (:mod:`leantune.optim.competitors`, measured by ``benchmarks/competitors.py``), plus
    ``"floor"``."""
    names = list(_OPTIMIZERS) + [n + _IN_BACKWARD for n in _OPTIMIZERS if n not in _ALREADY_FUSED]
    return names + [FLOOR]


def _resolve_optimizer(name: str) -> tuple[str, _OptimModel | None, bool]:
    """``(base name, memory model, in_backward)``; the model is ``None`` for ``"floor"``."""
    key = str(name).lower().replace("-", "_")
    if key == FLOOR:
        return FLOOR, None, False
    in_backward = key.endswith(_IN_BACKWARD)
    base = key.removesuffix(_IN_BACKWARD)
    if base in _OPTIMIZERS and not (in_backward and base in _ALREADY_FUSED):
        return base, _OPTIMIZERS[base], in_backward
    known = estimator_optimizers()
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    why = ""
    if base.startswith("sophia"):
        why = " Sophia keeps the graph of the gradients and is not modelled."
    elif base in _MEASURED_ONLY:
        why = (
            f" {base} comes from another package and is measured, not modelled: "
            "python benchmarks/competitors.py (results in benchmarks/results/competitors_*.md)."
        )
    raise ValueError(f"Unknown optimizer {name!r}.{hint}{why} Known: {', '.join(known)}")


def canonical_optimizer(name: str) -> str:
    """``name`` normalised (``"AdamW-in-backward"`` -> ``"adamw_in_backward"``).

    Raises:
        ValueError: the estimate does not model it (the message suggests the closest name).
    """
    base, _, in_backward = _resolve_optimizer(name)
    return base + (_IN_BACKWARD if in_backward else "")


def _state_bytes(kind: _OptimModel, shape: tuple[int, ...], weight_bytes: int) -> int:
    n = math.prod(shape)
    if kind.state == "moments":
        return kind.moments * n * weight_bytes
    if kind.state.startswith("factored"):
        if len(shape) < 2:
            return n * (4 if kind.state == "factored_fp32" else weight_bytes)
        if kind.state == "factored_fp32":  # AdaLomo: rows and columns of the (n / cols) x cols view
            return (n // shape[-1] + shape[-1]) * 4
        # torch's Adafactor: one row and one column statistic per matrix of a stack (E x R x C)
        return (n // shape[-1] + n // shape[-2]) * weight_bytes
    return 0


# ------------------------------------------------------------------------------------------ setup
@dataclass(frozen=True)
class TrainSetup:
    """One training configuration.

    Attributes:
        optimizer: a name of :func:`estimator_optimizers`; ``"floor"`` is forward + backward with
            each gradient dropped as soon as it is complete (no optimizer).
        seq_len: tokens per sequence.
        batch_size: sequences per micro-batch per device.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (everything in that dtype), or ``"mixed"``:
            fp32 weights, gradients and state, forward under bf16 autocast.
        grad_checkpointing: activation checkpointing of every decoder layer (transformers'
            non-reentrant ``activation_checkpointing_enable()``).
        accumulation_steps: micro-batches per optimizer step.
        world_size: devices.
        strategy: ``"none"``, ``"ddp"`` (replicas) or ``"fsdp"`` (FSDP2: weights, gradients and
            state sharded over ``world_size``, one unit per decoder layer plus the root).
        device: ``"cpu"`` (peak RSS, validated) or ``"cuda"`` (device memory, modelled).
        padded: batches contain padding (an attention mask with zeros): an ``L x L`` mask per
            layer and k/v repeated to all heads (see :func:`activation_bytes_per_token`).
        loss_chunk: tokens per chunk of leantune's chunked linear cross-entropy (``train.loss_chunk``,
            default 256): one chunk's logits at a time and the head's gradient; 0 = the family's
            standard loss on the full fp32 logits.
        tp: tensor-parallel degree (``dist.tp``): the attention and MLP matrices split over ``tp``
            devices, embeddings and head whole, the residual stream replicated.
        pp: pipeline stages (:mod:`leantune.distributed.pipeline`): contiguous decoder layers per
            stage, the embedding on the first, final norm, head and loss on the last; the pipeline's
            micro-batches are the ``accumulation_steps`` (of ``batch_size`` sequences each).
        schedule: the pipeline schedule, ``"1f1b"`` (stage ``i`` holds the activations of at most
            ``pp - i`` micro-batches) or ``"gpipe"`` (every stage holds all of them).

    ``world_size`` is ``tp x pp x`` the data-parallel degree, over which ``strategy`` applies.
    """

    optimizer: str = "adalomo"
    seq_len: int = 512
    batch_size: int = 1
    dtype: str = "bf16"
    grad_checkpointing: bool = False
    accumulation_steps: int = 1
    world_size: int = 1
    strategy: str = "none"
    device: str = "cpu"
    padded: bool = False
    loss_chunk: int = 256  # = leantune.loss.DEFAULT_CHUNK (not imported: this module loads no torch)
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"

    def __post_init__(self) -> None:
        _resolve_optimizer(self.optimizer)
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be an integer >= 0 (0 = standard), got {self.loss_chunk!r}")
        for key in ("seq_len", "batch_size", "accumulation_steps", "world_size", "tp", "pp"):
            _check_int(key, getattr(self, key))
        checks = (("dtype", DTYPE_MODES), ("strategy", STRATEGIES), ("device", DEVICES))
        for key, allowed in (*checks, ("schedule", SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"Invalid {key}: {getattr(self, key)!r} (choose from {', '.join(allowed)})")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world_size {self.world_size} is not divisible by tp x pp = {self.tp} x {self.pp}: "
                "the devices are tp x pp x data-parallel replicas"
            )
        if self.strategy == "none" and self.data_parallel != 1:
            layout = f" with tp x pp = {self.tp * self.pp}" if self.tp * self.pp > 1 else ""
            raise ValueError(
                f"world_size {self.world_size}{layout} needs strategy 'ddp' or 'fsdp'"
                + (f" for its {self.data_parallel} data-parallel replicas" if layout else "")
            )

    @property
    def data_parallel(self) -> int:
        """Data-parallel degree: ``world_size / (tp x pp)``."""
        return self.world_size // (self.tp * self.pp)

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch per device."""
        return self.seq_len * self.batch_size


# ------------------------------------------------------------------------------------ activations
def activation_bytes_per_token(
    shape: ModelShape, dtype: str, *, padded_len: int | None = None, tp: int = 1
) -> dict[str, int]:
    """Bytes autograd saves for backward per token: one decoder layer, the tail, a layer input.

    Counted from transformers 5.x ``LlamaDecoderLayer`` with SDPA, distinct storages (checked with
    ``torch.autograd.graph.saved_tensors_hooks``):

    * each RMSNorm: its input in fp32 (4h; in fp32 the residual stream itself), ``rsqrt(var)``
      (4 bytes), the normalised input cast back to the compute dtype, and ``weight * x`` (the next
      linears' shared input). Under autocast ``weight * x`` stays fp32 and is not saved, but each
      following linear saves its own bf16 cast of it (3 for q/k/v, 2 for gate/up);
    * attention: q and k after RoPE (RoPE's products save only cos/sin, which need no gradient), v,
      the SDPA output (``o_proj`` reuses it as a view) and the fp32 log-sum-exp per head;
    * MLP: gate output (SiLU input), SiLU output, up output, their product (``down_proj`` input).

    With padded batches (an attention mask with zeros), transformers repeats k/v to all heads
    (SDPA's native grouped-query path needs no mask) and SDPA saves, per layer, the mask converted
    to the compute dtype: ``seq_len`` more bytes per token and element size.

    Under tensor parallelism (``tp > 1``) each device saves ``1/tp`` of the attention (its local
    heads) and of the MLP (its local features); the norms, autocast's casts of their outputs, the
    residual stream and a padding mask are whole on every device (no sequence parallelism).

    Args:
        shape: the model.
        dtype: one of :data:`DTYPE_MODES`.
        padded_len: the sequence length, when batches are padded.
        tp: tensor-parallel degree (must divide the head counts and the MLP width).

    Returns:
        ``layer``: one decoder layer; ``tail``: the final norm, the ``lm_head`` input cast (mixed),
        input ids and labels; ``layer_input``: the residual stream entering a layer (what
        checkpointing keeps per layer).
    """
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    s = _COMPUTE_BYTES[dtype]
    attention = s * (2 * q + 2 * kv) + 4 * shape.num_heads
    if padded_len is not None:
        attention += 2 * s * (q - kv)
    attention //= tp  # exact: tp divides the head counts
    if padded_len is not None:
        attention += s * padded_len
    mlp = 4 * s * i // tp
    if dtype == "mixed":
        norm = 8 * h + 4  # x and x * rsqrt(var), fp32 because the residual stream is fp32
        casts, head_cast, residual = 5 * 2 * h, 2 * h, 4 * h
    else:
        norm = 4 * h + 2 * s * h + 4
        casts, head_cast, residual = 0, 0, s * h
    return {
        "layer": 2 * norm + casts + attention + mlp,
        "tail": norm + head_cast + 16,
        "layer_input": residual,
    }


# ----------------------------------------------------------------------------------------- result
_TERMS = ("weights", "gradients", "optimizer_state", "activations", "logits", "temporaries", "overhead")
_LABELS = dict(zip(_TERMS, ("weights", "gradients", "optimizer state", "activations", "logits / loss")))
_LABELS |= {"temporaries": "temporaries", "overhead": "framework overhead"}


@dataclass
class MemoryBreakdown:
    """Peak memory per device of one training step, by component, at the peak moment.

    Sizes are bytes; ``total`` is their sum. ``moment`` names the moment of the step where memory
    peaks, ``moments`` the total at every moment evaluated, ``notes`` a short note per component.
    Under pipeline parallelism the breakdown is the heaviest stage's (``stage``; ``stage_totals``
    has every stage's peak). ``communication`` is what one device sends per optimizer step, by
    kind (:func:`communication_per_step`; empty on one device).
    """

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    temporaries: int
    overhead: int
    moment: str
    shape: ModelShape
    setup: TrainSetup
    moments: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    communication: dict[str, int] = field(default_factory=dict)
    stage: int = 0
    stage_totals: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in _TERMS)

    def fits(self, budget_bytes: int) -> bool:
        """Whether the estimated peak fits in ``budget_bytes``."""
        return self.total <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the components and total in bytes, the moments, notes and inputs."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _TERMS}
        out |= {"total": self.total, "moment": self.moment, "moments": dict(self.moments)}
        out |= {"parameters": self.shape.parameters, "notes": dict(self.notes)}
        if self.communication:
            out["communication"] = dict(self.communication)
        if self.setup.pp > 1:
            out |= {"stage": self.stage, "stage_totals": list(self.stage_totals)}
        model = {f.name: getattr(self.shape, f.name) for f in fields(self.shape) if f.name != "config"}
        out |= {"model": model, "setup": asdict(self.setup)}
        return out

    def format(self) -> str:
        """A readable table in GiB."""
        st, sh = self.setup, self.shape
        extras = [st.device]
        if st.grad_checkpointing:
            extras.append("activation checkpointing")
        if st.accumulation_steps > 1 and st.pp == 1:
            extras.append(f"{st.accumulation_steps} accumulation steps")
        if st.tp * st.pp > 1:
            dp = f"dp {st.data_parallel} ({st.strategy})" if st.data_parallel > 1 else "dp 1"
            extras.append(f"tp {st.tp} x pp {st.pp} x {dp} = {st.world_size} devices")
            if st.pp > 1:
                extras.append(f"{st.schedule} over {st.accumulation_steps} micro-batches")
        elif st.strategy != "none":
            extras.append(f"{st.strategy} over {st.world_size} devices")
        lines = [
            f"Peak memory per device of one training step (estimate): {sh.name}, "
            f"{_count(sh.parameters)} params, {st.optimizer}, {st.dtype}, seq {st.seq_len} x batch "
            f"{st.batch_size}, {', '.join(extras)}",
            "",
            f"  {'component':<20}{'GiB':>9}  note",
        ]
        for key in _TERMS:
            note = self.notes.get(key, "")
            lines.append(f"  {_LABELS[key]:<20}{getattr(self, key) / GiB:>9.3f}  {note}".rstrip())
        at = f"at: {self.moment}" + (f" on stage {self.stage} of {st.pp}" if st.pp > 1 else "")
        lines += [f"  {'-' * 29}", f"  {'total (peak)':<20}{self.total / GiB:>9.3f}  {at}"]
        if st.pp > 1:
            per_stage = ", ".join(f"{t / GiB:.2f}" for t in self.stage_totals)
            lines.append(f"  {'stages (GiB)':<20}{'':>9}  {per_stage}")
        if self.communication:
            where = self.notes.get("communication", "one device")
            lines += ["", f"  communication per optimizer step, bytes sent by {where}:"]
            for key, value in self.communication.items():
                if value:
                    lines.append(f"  {key:<20}{value / GiB:>9.3f}  {_COMM_NOTES[key]}")
            lines.append(f"  {'total sent':<20}{sum(self.communication.values()) / GiB:>9.3f}")
        if "layout" in self.notes:
            lines += ["", f"  layout: {self.notes['layout']}"]
        loss = (
            f"chunked loss ({st.loss_chunk} tokens per chunk)"
            if st.loss_chunk and st.pp == 1
            else "standard loss (full fp32 logits)"
            + (" on the last stage, as leantune.distributed.pipeline computes it" if st.pp > 1 else "")
        )
        assumes = f"assumes: {loss}"
        if st.device == "cpu":
            assumes += "; glibc's mmap threshold fixed, as `leantune train` sets it"
        return "\n".join([*lines, "", f"  {assumes}"])


# ------------------------------------------------------------------------------------ the model
def _chunk(shape: tuple[int, ...]) -> int:
    """Elements in one chunk of a fused update (whole rows, at most CHUNK_ELEMENTS)."""
    cols = shape[-1] if len(shape) >= 2 else 1
    rows = math.prod(shape) // cols
    return min(rows, max(1, CHUNK_ELEMENTS // cols)) * cols


def _fused_scratch(base: str, kind: _OptimModel | None, shape: tuple[int, ...], setup: TrainSetup) -> int:
    """Temporaries of one in-backward update of a tensor of ``shape``, besides its gradient.

    From leantune.optim: ``GradientView.chunk`` returns the gradient itself when it is fp32 and
    untransformed, else an fp32 copy of the chunk; ``WriteBack`` updates low-precision weights
    through an fp32 copy of the chunk; AdaLomo writes ``g^2`` and then ``g * b`` into its persistent
    workspace (counted as optimizer state), and keeps a single-chunk tensor's gradient copy until
    the write-back; ``InBackward`` materialises the whole effective gradient in fp32
    (``GradientView.full``), casts it to the weight dtype and steps the inner optimizer on it.
    """
    if kind is None:  # floor: the hook only drops the gradient
        return 0
    n, c, w = math.prod(shape), _chunk(shape), _WEIGHT_BYTES[setup.dtype]
    low = w < 4
    transformed = low or setup.accumulation_steps > 1  # accumulation adds an fp32 buffer
    reduced = 0
    if setup.strategy == "ddp" and setup.data_parallel > 1:
        # Replicated data parallelism: the hook all-reduces an fp32 copy of the whole gradient,
        # which then serves as an untransformed fp32 gradient.
        reduced, transformed = 4 * n, False
    copy = 4 * c if transformed else 0
    if base == "lomo":
        return reduced + copy + (4 * c if low else 0)
    if base == "adalomo":
        if len(shape) < 2:
            return reduced + copy + 8 * n  # g^2 and the update u, fp32
        work = 4 * c if low else 0
        return reduced + (copy + work if c == n else max(copy, work))
    full = 4 * n if transformed else 0
    scratch = 1 if setup.device in kind.foreach_devices else kind.step_scratch  # one tensor here
    return int(reduced + full + (n * w if low else 0) + scratch * n * w)


def _activations(shape: ModelShape, setup: TrainSetup) -> tuple[list[float], float, float, bool]:
    """(bytes saved per layer, by the tail, per token of a layer's input; counted on the family's
    code?) for one micro-batch."""
    tokens = setup.tokens
    residual = (4 if setup.dtype == "mixed" else _COMPUTE_BYTES[setup.dtype]) * shape.hidden_size
    padded_len = setup.seq_len if setup.padded else None
    fp = shape.footprint(setup.dtype, setup.padded)
    if fp is not None:
        layers = [layer.saved(setup.seq_len, setup.batch_size) for layer in fp.layers]
        if setup.tp > 1:
            # The family's count is of whole layers: take off what tensor parallelism removes in the
            # LLaMA formulas ((tp - 1) / tp of the attention and MLP tensors).
            whole = activation_bytes_per_token(shape, setup.dtype, padded_len=padded_len)["layer"]
            local = activation_bytes_per_token(shape, setup.dtype, padded_len=padded_len, tp=setup.tp)
            layers = [max(0.0, b - tokens * (whole - local["layer"])) for b in layers]
        # the footprint's forward had no labels: the loss saves them (int64)
        return layers, fp.tail(setup.seq_len) * setup.batch_size + 8 * tokens, residual, True
    per_tok = activation_bytes_per_token(shape, setup.dtype, padded_len=padded_len, tp=setup.tp)
    return (
        [tokens * per_tok["layer"]] * shape.num_layers,
        tokens * per_tok["tail"],
        per_tok["layer_input"],
        False,
    )


def _estimate_part(
    shape: ModelShape, setup: TrainSetup, part: _Part, acts: tuple[list[float], float, float, bool]
) -> MemoryBreakdown:
    """The peak of one device holding ``part`` (the whole model without tp and pp)."""
    base, kind, in_backward = _resolve_optimizer(setup.optimizer)
    fused = kind is None or kind.fused or in_backward
    mixed = setup.dtype == "mixed"
    w, s = _WEIGHT_BYTES[setup.dtype], _COMPUTE_BYTES[setup.dtype]
    tokens, hidden, vocab = setup.tokens, shape.hidden_size, shape.vocab_size
    params = shape.parameters if part.whole else part.parameters
    ranks = setup.data_parallel
    fsdp = setup.strategy == "fsdp" and ranks > 1
    shard = 1 / ranks if setup.strategy == "fsdp" else 1.0
    notes: dict[str, str] = {}

    # Weights. leantune's FSDP2 units are each decoder layer, the embedding and the head (tied ones
    # stay in the root unit, unsharded from forward to the end of backward); FSDP all-gathers the
    # next layer while one computes (two layers at once) and the head around the loss.
    weights = params * w * shard
    notes["weights"] = f"{_count(params)} params x {w} B" + (f" / {ranks} ranks" if shard < 1 else "")
    if fsdp:
        unit_bytes = 2 if mixed else w  # "mixed" = MixedPrecisionPolicy(param_dtype=bf16)
        head = (shape.root_parameters if shape.tie_word_embeddings else vocab * hidden) if part.last else 0
        weights += (head + 2 * part.layer_parameters) * unit_bytes * (1 - shard)
        notes["weights"] += " + 2 layers and the head unsharded" if part.last else " + 2 layers unsharded"
    fwd_weights = weights
    if mixed and not fsdp:
        # autocast caches a bf16 copy of every linear weight; each linear saves its copy for backward.
        fwd_weights += 2 * (shape.cast_parameters() if part.whole else part.cast_parameters(shape))

    state = 0.0
    if kind is not None:
        state = sum(_state_bytes(kind, shp, w) for _, shp in part.tensors) * shard
        notes["optimizer_state"] = kind.note
        if base == "adalomo":
            # An fp32 workspace of the largest update chunk, kept by the optimizer between updates.
            state += 4 * max(_chunk(shp) for _, shp in part.tensors if len(shp) >= 2)
            notes["optimizer_state"] += " + a chunk workspace"

    # Gradients (in the parameter dtype). Accumulation: fused optimizers keep an fp32 buffer per
    # parameter, ordinary ones keep .grad between micro-batches. DDP buckets hold a copy of them.
    all_grads = params * w * shard
    acc = 0.0
    if setup.accumulation_steps > 1 and kind is not None:
        acc = 4 * params * shard if fused else all_grads
    ddp = all_grads if (setup.strategy == "ddp" and ranks > 1 and not fused) else 0.0
    lm_grad = vocab * hidden * w
    lm_grad_arriving = vocab * hidden * (2 + 4) if mixed else lm_grad  # bf16 grad, then its fp32 cast
    layer_shape = max((sh for _, sh in part.largest_layer), key=math.prod)
    layer_grad = math.prod(layer_shape) * w
    # FSDP2 reduce-scatters a layer's unsharded gradients after its backward.
    unit_grads = part.layer_parameters * w if fsdp else 0

    all_acts, tail_act, layer_input, counted = acts
    layer_acts = [all_acts[j] for j in part.layers]
    tail_act = tail_act if part.last else 0
    n_layers, m = len(part.layers), part.in_flight  # micro-batches whose activations are kept
    rope = 2 * setup.seq_len * shape.head_dim * (4 if mixed else s)  # cos/sin, shared by all layers
    if setup.grad_checkpointing:
        kept = n_layers * tokens * layer_input * m + tail_act + rope * m
        if setup.padded:  # the boolean 4-D mask is an input of every checkpointed layer
            kept += setup.batch_size * setup.seq_len**2 * m
        # The last layer is recomputed for its backward; the tail's tensors are freed by then. When
        # the residual stream is fp32 the first norm saves the kept layer input itself: count once.
        dedupe = tokens * layer_input if layer_input == 4 * hidden and not counted else 0
        last_layer = kept - tail_act + layer_acts[-1] - dedupe
        notes["activations"] = f"{n_layers} layer inputs (checkpointing) + 1 layer recomputed"
    else:
        kept = sum(layer_acts) * m + tail_act + (0 if counted else rope) * m  # counted: in layer 0
        last_layer = kept - tail_act
        mean = sum(layer_acts) / len(layer_acts)
        notes["activations"] = f"{n_layers} layers x {format_bytes(mean)}" + (
            " (mean)" if len(set(layer_acts)) > 1 else ""
        )
    if m > 1:
        notes["activations"] += f", {m} micro-batches in flight"
    if setup.pp > 1:
        # torch.distributed.pipelining keeps a receive buffer per micro-batch for the stage's input
        # (with checkpointing, the first layer's kept input is that buffer) and for the gradient of
        # its output, and the output of each micro-batch in flight until its backward; the last
        # stage, the log-probabilities its loss saved and the logits of the other micro-batches.
        act, n = tokens * layer_input, setup.accumulation_steps
        buffers = 0 if part.first else (n - (m if setup.grad_checkpointing else 0)) * act
        buffers += (n + m) * act if not part.last else (m - 1) * tokens * vocab * (4 + s)
        kept += buffers
        last_layer += buffers
        notes["activations"] += " + pipeline buffers"
    if counted:
        notes["activations"] += ", counted on the family's own code"
    # Backward of SiLU(gate) * up: the incoming hidden-state gradient plus d(product), d(SiLU) and
    # d(up) alive while only the product itself has been freed (other MLPs: bounded by the same).
    mlp_bwd = s * tokens * (hidden + 2 * shape.intermediate_size // setup.tp)
    grad_hidden = s * tokens * hidden

    if setup.device == "cpu":
        overhead = CPU_IMPORT_OVERHEAD + CPU_RUNTIME_OVERHEAD
        overhead += _MODEL_BUILD_OVERHEAD + _PER_TENSOR_OVERHEAD * shape.num_tensors
        notes["overhead"] = "python + torch + transformers, model objects, first-step scratch"
    else:
        overhead = CUDA_CONTEXT_OVERHEAD
        notes["overhead"] = "CUDA context (a guess)"

    tied = shape.tie_word_embeddings
    # Gradients still waiting at the last layer: lm_head's for ordinary optimizers, a tied matrix's
    # (its update waits for the embedding's contribution; under FSDP it is in the root unit, which
    # reduce-scatters at the end of backward).
    held = lm_grad if (tied or not fused) and part.last else 0
    moments: dict[str, dict[str, float]] = {}
    if not part.last:
        notes["logits"] = "none on this stage (the loss is on the last)"
    elif setup.loss_chunk:
        # leantune.loss.linear_cross_entropy: a chunk's fp32 logits turned into the softmax in place,
        # with the compute-dtype logits before or the compute-dtype gradient after them
        # (workspace_bytes); the head's gradient built in the loss's forward in the compute dtype
        # (cast to the weights' at the end under "mixed"); the hidden-state gradient; the chunk's
        # hidden states.
        chunk = min(setup.loss_chunk, tokens)
        workspace = chunk * vocab * (4 + (s if s < 4 else 0))
        head_grad = vocab * hidden * (s + (w if w != s else 0))
        cast_head = 2 * vocab * hidden if mixed else 0  # fp32 head in bf16 autocast: its bf16 copy
        moments = {
            "chunked loss": {
                "gradients": head_grad,
                "activations": kept,
                "logits": workspace,
                "temporaries": grad_hidden + s * chunk * hidden + 4 * tokens + cast_head,
            },
            "lm_head backward": {"gradients": lm_grad, "activations": kept, "temporaries": grad_hidden},
        }
        notes["logits"] = f"one chunk: {chunk} of {tokens} tokens x {vocab} vocab (train.loss_chunk)"
    else:
        cached = s * tokens * vocab if setup.pp > 1 else 0  # the stage output, kept by the schedule
        moments = {
            "log-softmax backward": {"activations": kept, "logits": 3 * 4 * tokens * vocab + cached},
            "lm_head backward": {
                "gradients": lm_grad_arriving,
                "activations": kept,
                "logits": s * tokens * vocab,  # dL/dlogits in the compute dtype
                "temporaries": grad_hidden,
            },
        }
        notes["logits"] = f"{tokens} tokens x {vocab} vocab, fp32 for the loss " + (
            "(the pipeline's last stage)" if setup.pp > 1 else "(train.loss_chunk=0)"
        )
    moments |= {
        "last layer backward": {
            "gradients": held + (0 if fused else layer_grad) + unit_grads,
            "activations": last_layer,
            "temporaries": mlp_bwd,
        },
    }
    if fused:
        if part.last and not tied:
            moments["lm_head update"] = {
                "gradients": lm_grad,
                "activations": kept,
                "temporaries": grad_hidden + _fused_scratch(base, kind, (vocab, hidden), setup),
            }
        moments["last layer update"] = {
            "gradients": held + layer_grad + unit_grads,
            "activations": last_layer,
            "temporaries": grad_hidden + _fused_scratch(base, kind, layer_shape, setup),
        }
        if tied:  # the tied matrix's update waits for the embedding's contribution
            moments["embedding update"] = {
                "weights": weights,
                "gradients": lm_grad + (4 * vocab * hidden * shard if acc else 0),  # the last buffer
                "temporaries": _fused_scratch(base, kind, (vocab, hidden), setup),
            }
        notes["gradients"] = ("fp32 accumulation buffers + " if acc else "") + "one tensor at a time"
    else:
        if setup.device in kind.foreach_devices:
            scratch = params * w * shard
        else:
            scratch = kind.step_scratch * max(math.prod(sh) for _, sh in part.tensors) * w
        # (with accumulation, the gradients held between micro-batches are these same tensors)
        moments["optimizer step"] = {"weights": weights, "gradients": all_grads, "temporaries": scratch}
        notes["gradients"] = "all of them at step()" + (" + DDP buckets" if ddp else "")

    totals: dict[str, int] = {}
    for name, terms in moments.items():
        terms.setdefault("weights", fwd_weights)
        held_acc = acc if name not in ("optimizer step", "embedding update") else 0
        terms["gradients"] = terms.get("gradients", 0) + held_acc + ddp
        totals[name] = int(sum(terms.values()) + state + overhead)
    peak = max(totals, key=totals.__getitem__)
    terms = {k: int(moments[peak].get(k, 0)) for k in ("weights", "gradients", "activations", "logits")}
    terms["temporaries"] = int(moments[peak].get("temporaries", 0))
    notes["model"] = (
        "parameters and activations counted on the family's own modelling code (fake tensors)"
        if counted
        else "parameters and activations from the LLaMA formulas"
    )
    if terms["weights"] > weights:
        notes["weights"] += " + bf16 autocast copies"
    for key in ("activations", "logits", "temporaries"):
        if terms[key] < MiB:
            notes[key] = "none alive at this moment" if terms[key] == 0 else ""
    return MemoryBreakdown(
        **terms,
        optimizer_state=int(state),
        overhead=int(overhead),
        moment=peak,
        shape=shape,
        setup=setup,
        moments=totals,
        notes=notes,
    )


def estimate_memory(shape: ModelShape, setup: TrainSetup) -> MemoryBreakdown:
    """Estimate the peak memory per device of one training step.

    With tensor or pipeline parallelism each device holds a part of the model (its stage's layers,
    ``1/tp`` of their attention and MLP matrices): the result is the heaviest stage's peak, with
    every stage's total in ``stage_totals``. With more than one device it also carries what one
    device sends per step (:func:`communication_per_step`).

    Args:
        shape: the model (see :meth:`ModelShape.resolve`).
        setup: the training configuration.

    Returns:
        The breakdown at the moment of the step where memory peaks.

    Raises:
        ValueError: a layout the model cannot take (``tp`` not dividing the head counts or the
            split widths, more stages than layers, tied embeddings across stages, MoE under tp).
    """
    parts = _parts(shape, setup)
    # leantune.distributed.pipeline's last stage computes the standard loss on the full logits
    run = replace(setup, loss_chunk=0) if setup.pp > 1 else setup
    acts = _activations(shape, run)
    results = [_estimate_part(shape, run, part, acts) for part in parts]
    peak = max(results, key=lambda b: b.total)  # the first of equal stages
    peak.setup = setup
    if setup.pp > 1:
        peak.stage = parts[results.index(peak)].index
        peak.stage_totals = [b.total for b in results]
    if setup.world_size > 1:
        sent = [_communication(shape, setup, part) for part in parts]
        busiest = max(range(len(sent)), key=lambda i: sum(sent[i].values()))
        peak.communication = sent[busiest]
        if setup.pp > 1:
            peak.notes["communication"] = f"one device of stage {busiest}"
    if setup.tp * setup.pp > 1:
        part = parts[peak.stage]
        held = [f"layers {part.layers[0]}-{part.layers[-1]}"] if setup.pp > 1 else []
        held += (["embedding"] if part.first else []) + (["head"] if part.last else [])
        tp = f"; 1/{setup.tp} of each attention/MLP matrix" if setup.tp > 1 else ""
        peak.notes["weights"] += f" ({', '.join(held)}{tp})"
        peak.notes["layout"] = _layout_note(setup)
    return peak


def communication_per_step(shape: ModelShape, setup: TrainSetup, stage: int | None = None) -> dict[str, int]:
    """Bytes one device sends per optimizer step, by kind (a ring all-reduce of ``S`` bytes over
    ``N`` devices sends ``2 (N-1)/N S`` per device, an all-gather or reduce-scatter ``(N-1)/N S``):

    * ``tp activations``: per layer and micro-batch, the all-reduces of ``(tokens, hidden)``
      activations: after ``o_proj`` and ``down_proj`` in forward (again in the recomputed forward
      with checkpointing), before the q/k/v and gate/up groups in backward (fp32 under ``mixed``);
    * ``tp statistics``: AdaLomo's sums over a split matrix: the column sums, mean row statistic
      and the two RMS sums of a column-wise split (``in + 3`` floats), the row sums and the RMS sums
      of a row-wise one (``out + 2``), the RMS sums of a split bias;
    * ``pp activations``: point to point, per micro-batch: the stage output to the next stage, the
      gradient of its input to the previous one;
    * ``ddp gradients``: every local gradient all-reduced, in fp32 once per step by the fused
      optimizers' hooks, in the parameter dtype per micro-batch by ``DistributedDataParallel``;
    * ``fsdp weights/grads``: per micro-batch, every unit all-gathered in forward and again in
      backward and its gradients reduce-scattered (bf16 under ``mixed``);
    * ``fsdp statistics``: AdaLomo's sums over row shards (``cols + 3`` floats per matrix, 2 per
      vector).

    No norm clipping or loss scaling (their few scalars) is counted.

    Args:
        shape: the model.
        setup: the training configuration.
        stage: the pipeline stage; default: the stage whose devices send the most.
    """
    sent = [_communication(shape, setup, part) for part in _parts(shape, setup)]
    if stage is None:
        return max(sent, key=lambda c: sum(c.values()))
    return sent[stage]


_COMM_NOTES = {
    "tp activations": "all-reduces of activations: 2 forward (+2 recomputed), 2 backward per layer",
    "tp statistics": "AdaLomo's row/column sums of split matrices (all-reduces)",
    "pp activations": "point to point: outputs forward, input gradients backward, per micro-batch",
    "ddp gradients": "all-reduce of every gradient",
    "fsdp weights/grads": "all-gather in forward and backward, reduce-scatter, per micro-batch",
    "fsdp statistics": "AdaLomo's sums over the shards (all-reduces)",
}


# ------------------------------------------------------------------ tensor and pipeline parallelism
_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output features
_ROWWISE = ("o_proj", "down_proj")  # split by input features
_EMBEDDINGS = ("embed", "wte", "wpe")  # root tensors on the first pipeline stage


@dataclass(frozen=True)
class _Part:
    """What one device holds: a pipeline stage (the whole model without pp), its tensors as one
    tensor-parallel rank holds them, and the micro-batches whose activations it keeps at its peak.

    ``tensors`` are the local shapes of every parameter of the stage; ``largest_layer`` the local
    tensors of its largest decoder layer; ``whole``: tp = pp = 1, the model's own counts apply.
    """

    index: int
    layers: tuple[int, ...]
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    largest_layer: tuple[tuple[str, tuple[int, ...]], ...]
    first: bool
    last: bool
    in_flight: int
    whole: bool

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors)

    @property
    def layer_parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.largest_layer)

    def cast_parameters(self, shape: ModelShape) -> int:
        """Elements bf16 autocast copies: the layers' linear weights and biases, the untied head."""
        linear = sum(math.prod(s) for n, s in self.tensors if n.startswith("layers.") and "norm" not in n)
        return linear + (shape.vocab_size * shape.hidden_size if self.last else 0)


def _tp_style(name: str) -> tuple[str | None, bool]:
    """(``"colwise"``, ``"rowwise"`` or None; a bias?) of a layer tensor, by its module's name:
    ``self_attn.q_proj.weight`` (a family's config) or ``q_proj``, ``q_bias`` (LLaMA formulas)."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
    bias = parts[-1] == "bias" or module.endswith("_bias")
    module = module.removesuffix("_bias") + "_proj" if module.endswith("_bias") else module
    style = "colwise" if module in _COLWISE else "rowwise" if module in _ROWWISE else None
    return style, bias


def _tp_local(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """A layer tensor's shape on one of ``tp`` ranks, as
    :func:`leantune.distributed.tensor_parallel.apply_tensor_parallel` splits it: column-wise
    layers keep ``out / tp`` rows (and of their bias), row-wise ``in / tp`` columns and the whole
    bias; everything else (norms) is whole."""
    style, bias = _tp_style(name)
    if tp == 1 or style is None or (style == "rowwise" and bias):
        return shape
    dim = 0 if style == "colwise" else len(shape) - 1
    if shape[dim] % tp:
        features = "output" if style == "colwise" else "input"
        raise ValueError(f"tp={tp} must divide the {features} features of {name} ({shape[dim]})")
    return (*shape[:dim], shape[dim] // tp, *shape[dim + 1 :])


def _stage_layer_counts(n_layers: int, stages: int) -> list[int]:
    """Decoder layers per stage: contiguous, the first stages take the remainder (the split of
    :func:`leantune.distributed.pipeline.stage_layer_counts`, which imports torch)."""
    base, extra = divmod(n_layers, stages)
    return [base + (i < extra) for i in range(stages)]


def _check_layout(shape: ModelShape, setup: TrainSetup) -> None:
    tp, pp, layers = setup.tp, setup.pp, shape.num_layers
    if tp > 1:
        for key, value in (
            ("num_attention_heads", shape.num_heads),
            ("num_key_value_heads", shape.num_kv_heads),
        ):
            if value % tp:
                raise ValueError(f"tp={tp} must divide {key} = {value}")
        fp = shape.footprint()
        if fp is not None and fp.experts:
            raise ValueError(f"tp={tp}: {shape.name} has MoE experts, which dist.tp does not split")
        styles = {_tp_style(name)[0] for name, _ in shape.layer_tensors()}
        if not {"colwise", "rowwise"} <= styles:
            raise ValueError(
                f"tp={tp}: the estimate splits LLaMA-style q/k/v/o and gate/up/down projections, and "
                f"{shape.name}'s layers have none ({', '.join(n for n, _ in shape.layer_tensors()[:3])}, ...)"
            )
    if pp > layers:
        raise ValueError(
            f"cannot split {layers} decoder layers into {pp} pipeline stages: every stage needs at least "
            f"one layer (use at most {layers} stages)"
        )
    if pp > 1 and shape.tie_word_embeddings:
        raise ValueError(
            "pp > 1: the model ties its input and output embeddings, which would live on the first and "
            "the last stage; leantune.distributed.pipeline refuses that (untie them first)"
        )


def _parts(shape: ModelShape, setup: TrainSetup) -> list[_Part]:
    """One :class:`_Part` per pipeline stage (validating the layout)."""
    tp, pp = setup.tp, setup.pp
    if tp == pp == 1:
        layers = tuple(range(shape.num_layers))
        return [_Part(0, layers, tuple(shape.tensors()), tuple(shape.layer_tensors()), True, True, 1, True)]
    _check_layout(shape, setup)
    fp = shape.footprint()
    per_layer = (
        [lf.params for lf in fp.layers] if fp is not None else [shape.layer_tensors()] * shape.num_layers
    )
    local = [tuple((n, _tp_local(n, s, tp)) for n, s in layer) for layer in per_layer]
    root = shape.root_tensors()
    embed = [(n, s) for n, s in root if any(k in n for k in _EMBEDDINGS)]
    rest = [(n, s) for n, s in root if (n, s) not in embed]
    parts, start = [], 0
    for i, count in enumerate(_stage_layer_counts(shape.num_layers, pp)):
        idx = tuple(range(start, start + count))
        start += count
        first, last = i == 0, i == pp - 1
        tensors = [(f"layers.{j}.{n}", s) for j in idx for n, s in local[j]]
        tensors += (embed if first else []) + (rest if last else [])
        largest = max((local[j] for j in idx), key=lambda ts: sum(math.prod(s) for _, s in ts))
        n = setup.accumulation_steps
        in_flight = 1 if pp == 1 else n if setup.schedule == "gpipe" else min(pp - i, n)
        parts.append(_Part(i, idx, tuple(tensors), largest, first, last, in_flight, False))
    return parts


def _communication(shape: ModelShape, setup: TrainSetup, part: _Part) -> dict[str, int]:
    """:func:`communication_per_step` of one device holding ``part``."""
    base, kind, in_backward = _resolve_optimizer(setup.optimizer)
    fused = kind is None or kind.fused or in_backward
    mixed = setup.dtype == "mixed"
    w, s = _WEIGHT_BYTES[setup.dtype], _COMPUTE_BYTES[setup.dtype]
    tp, dp, n = setup.tp, setup.data_parallel, setup.accumulation_steps
    act = setup.tokens * shape.hidden_size  # elements of one micro-batch's hidden states
    out: dict[str, int] = {}
    if tp > 1:
        ring = 2 * (tp - 1) / tp
        forward = 2 * s * (2 if setup.grad_checkpointing else 1)  # the recomputation repeats them
        backward = 2 * (4 if mixed else s)
        out["tp activations"] = int(n * len(part.layers) * (forward + backward) * act * ring)
        if base == "adalomo":
            floats = sum(
                _tp_statistics(name, sh) for j in part.layers for name, sh in _layer_params(shape, j)
            )
            out["tp statistics"] = int(4 * floats * ring)
    if setup.pp > 1:
        out["pp activations"] = int(n * act * (4 if mixed else s) * ((not part.last) + (not part.first)))
    if dp > 1 and kind is not None:
        params = shape.parameters if part.whole else part.parameters
        if setup.strategy == "ddp":
            per_step = 4 * params if fused else n * w * params
            out["ddp gradients"] = int(per_step * 2 * (dp - 1) / dp)
        else:
            unit = 2 if mixed else w
            out["fsdp weights/grads"] = int(3 * n * params * unit * (dp - 1) / dp)
            if base == "adalomo":
                floats = sum(sh[-1] + 3 if len(sh) >= 2 else 2 for _, sh in part.tensors)
                out["fsdp statistics"] = int(4 * floats * 2 * (dp - 1) / dp)
    return out


def _layer_params(shape: ModelShape, index: int) -> list[tuple[str, tuple[int, ...]]]:
    fp = shape.footprint()
    return list(fp.layers[index].params) if fp is not None else shape.layer_tensors()


def _tp_statistics(name: str, shape: tuple[int, ...]) -> int:
    """fp32 elements AdaLomo all-reduces over the tensor-parallel ranks for one (global) tensor."""
    style, bias = _tp_style(name)
    if style is None or (style == "rowwise" and bias):
        return 0  # whole on every rank
    if len(shape) < 2:
        return 2  # the update and weight sums of squares
    return shape[-1] + 3 if style == "colwise" else shape[0] + 2


def _layout_note(setup: TrainSetup) -> str:
    tp, pp, dp = setup.tp, setup.pp, setup.data_parallel
    runs = "leantune train runs it (dist.tp)"
    if pp > 1:
        runs = (
            "on paper: leantune train runs pipeline stages (dist.pp) with tp and ddp, not fsdp"
            if dp > 1 and setup.strategy == "fsdp"
            else "leantune train runs it (dist.pp; every rank also holds all the weights, not counted here)"
        )
    split = f"tp {tp}: attention/MLP matrices and their activations / {tp}, embeddings, head, norms whole"
    stages = f"pp {pp} ({setup.schedule}): stage = contiguous layers" if pp > 1 else ""
    return "; ".join(x for x in (split if tp > 1 else "", stages, runs) if x)
