"""Parameter-efficient fine-tuning through the ``peft`` library: LoRA (DoRA, rsLoRA), IA3, prefix
and prompt tuning.

leantune only translates its :class:`~leantune.config.PeftConfig` into a ``peft`` config, wraps the
model with ``peft.get_peft_model`` and handles where the files go; the adapters themselves are
peft's. The wrapped model keeps the base weights frozen (``requires_grad=False``), so any
optimizer built on it — including the fused ones, which hook only trainable tensors — trains and
keeps state for the adapter parameters alone.

Files:

* an adapter directory (a checkpoint's ``model/``, a run's ``final/``) is peft's format:
  ``adapter_config.json`` + ``adapter_model.safetensors`` (+ tokenizer files);
* ``adapter_config.json`` records the base model as an absolute path in
  ``base_model_name_or_path``: ``model.path`` for a run that fine-tunes a local model, or
  ``RUN_DIR/base`` for a run from a size preset (random init), whose base weights leantune saves
  there once, in HF format, because they exist nowhere else;
* when that path no longer exists (the run was moved), ``RUN_DIR/base`` is looked up next to the
  adapter instead (see :func:`resolve_base`).

Method notes (peft 0.21, transformers 5, ``LlamaForCausalLM``): LoRA, DoRA, rsLoRA, IA3 and prompt
tuning work with activation checkpointing; prefix tuning does not (peft refuses it), and prefix
and prompt tuning have no weights to merge (:func:`merge_adapter` refuses them).

Mixture-of-experts models keep their experts in 3-D tensors, not ``nn.Linear`` layers. With
``target_modules=[all-linear]``, LoRA also adapts them, and the routers, as parameters (peft's
``target_parameters``), for every family whose experts :mod:`leantune.anatomy` finds; DoRA and LoRA
dropout do not exist for parameters in peft and are refused for such models, IA3 adapts their linear
layers only (the log says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantune.anatomy import AnatomyError, model_anatomy
from leantune.checkpoint import is_shard, is_sharded
from leantune.config import PeftConfig

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BASE_DIR",
    "METHODS",
    "AdapterError",
    "adapter_notes",
    "build_peft_config",
    "is_adapter_dir",
    "is_prompt_learning",
    "lora_init",
    "load_adapter_model",
    "load_adapter_weights",
    "load_base_weights",
    "merge_adapter",
    "moe_parameter_targets",
    "resolve_base",
    "save_adapter",
    "save_base",
    "wrap_model",
]

METHODS = ("lora", "ia3", "prefix", "prompt")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"  # RUN_DIR/base: the base model of a preset-based adapter run
_ADAPTER = "default"  # peft's adapter name; leantune uses one adapter per model
_RELATIVE_STEP = ("adalomo", "adafactor")  # step = lr * max(eps2, RMS(p)): see lora_init
_PROMPT_LEARNING = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


class AdapterError(ValueError):
    """An adapter cannot be built, saved, loaded or merged (the message says why)."""


def _ia3_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """IA3 ``target_modules`` and ``feedforward_modules`` for [all-linear]: every linear layer
    (``nn.Linear`` or GPT-2's ``Conv1D``) but the head, by last name component, or by its path in
    the block where that name is used twice (GPT-2's attention and MLP ``c_proj``); the
    feed-forward ones are the layers that project the MLP back to the hidden size (down_proj,
    fc2, ...), whose input IA3 scales."""
    from leantune.anatomy import _dims, _is_projection, find_blocks

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        blocks = find_blocks(model)
    except AnatomyError:
        blocks = []
    in_blocks: dict[str, str] = {}  # full name -> path in its block
    for bname, block in blocks:
        for rel, m in block.named_modules():
            if rel and _is_projection(m):
                in_blocks[f"{bname}.{rel}"] = rel
    linear = [(n, m) for n, m in model.named_modules() if _is_projection(m) and m is not head]
    leaves: dict[str, set[str]] = {}
    for n, _ in linear:
        leaves.setdefault(n.rsplit(".", 1)[-1], set()).add(in_blocks.get(n, n))
    name = {
        n: (n.rsplit(".", 1)[-1] if len(leaves[n.rsplit(".", 1)[-1]]) == 1 else in_blocks.get(n, n))
        for n, _ in linear
    }
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    ff: set[str] = set()
    try:
        groups = [g for b in model_anatomy(model, probe=False).blocks for g in b.ffn]
    except AnatomyError:
        groups = []
    modules = dict(model.named_modules())
    for group in groups:
        # the layer back to the hidden size; with I == hidden, the last one of the group
        layers = [u.pieces[0].param.rsplit(".", 1)[0] for u in group if u.pieces[0].param.endswith("weight")]
        layers = [n for n in dict.fromkeys(layers) if n in name]
        down = [n for n in layers if _dims(modules[n])[0] == hidden]
        narrow = [n for n in down if _dims(modules[n])[1] != hidden]
        if down:
            ff.add(name[(narrow or down)[-1]])
    return sorted(set(name.values())), sorted(ff)


def moe_parameter_targets(model: nn.Module) -> list[str]:
    """peft ``target_parameters`` for the experts and routers of a MoE model, relative to the block
    (``mlp.experts.gate_up_proj``, ``mlp.gate.weight``); empty for a dense model. Routers that are
    ``nn.Linear`` layers are left to ``all-linear``."""
    try:
        anatomy = model_anatomy(model, probe=False)
    except AnatomyError:
        return []
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = set()
    for full in (*anatomy.experts, *anatomy.routers):
        if full in linear:
            continue
        block = next(b.name for b in anatomy.blocks if full.startswith(b.name + "."))
        out.add(full[len(block) + 1 :])
    return sorted(out)


def adapter_notes(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """Lines for the log about what an adapter leaves out of a MoE model (nothing for dense ones)."""
    targets = moe_parameter_targets(model)
    if not targets or cfg.method in ("prefix", "prompt"):
        return []
    if cfg.method == "ia3":
        return ["ia3 scales nn.Linear layers only: the experts' 3-D tensors are not adapted"]
    if cfg.target_modules != ["all-linear"]:
        return [
            "the experts' 3-D tensors are not adapted (peft.target_modules names linear layers); "
            "peft.target_modules=[all-linear] adapts them too"
        ]
    return [f"experts and routers adapted as parameters: {', '.join(targets)}"]


def lora_init(cfg: PeftConfig, optimizer: str | None = None) -> bool | str:
    """peft's ``init_lora_weights`` for ``peft.init`` (``auto`` depends on the optimizer's name).

    AdaLomo and Adafactor scale each step by the tensor's RMS (``lr * max(eps2, RMS(p))``), so
    a LoRA ``B`` initialised to zero moves by ``lr * 1e-3`` per step and the adapter barely trains;
    peft's orthogonal init starts ``B`` non-zero with ``B @ A = 0`` (the model is unchanged).
    """
    match cfg.init:
        case "default":
            return True
        case "gaussian" | "orthogonal":
            return cfg.init
        case "auto":
            name = (optimizer or "").lower().removesuffix("_in_backward")
            return "orthogonal" if name in _RELATIVE_STEP and cfg.r % 2 == 0 else True
        case other:
            raise AdapterError(f"peft.init must be auto, default, gaussian or orthogonal, got {other!r}")


def build_peft_config(cfg: PeftConfig, model: nn.Module | None = None, optimizer: str | None = None) -> Any:
    """The ``peft`` config (``LoraConfig``, ``IA3Config``, ...) for leantune's ``peft`` section.

    ``target_modules`` of ``[all-linear]`` becomes peft's ``"all-linear"`` (every linear layer
    except the output head); otherwise the names are matched as peft does (module-name suffixes).
    ``model`` is needed for IA3 with ``[all-linear]`` (see the note in the code), ``optimizer``
    (its name) for ``peft.init=auto`` (see :func:`lora_init`).
    """
    import peft

    target: str | list[str] = (
        "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    )
    task = peft.TaskType.CAUSAL_LM
    match cfg.method:
        case "lora":
            params = moe_parameter_targets(model) if model is not None and target == "all-linear" else []
            init = lora_init(cfg, optimizer)
            if params:
                family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
                for bad, what in (
                    (cfg.use_dora, "peft.use_dora=true"),
                    (cfg.dropout > 0, "peft.dropout > 0"),
                ):
                    if bad:
                        raise AdapterError(
                            f"{what} on {family}: peft has no DoRA or dropout for LoRA on parameters, "
                            "and [all-linear] adapts this model's experts (3-D tensors) as parameters. "
                            "Turn it off, or adapt linear layers only "
                            "(e.g. peft.target_modules=[q_proj,v_proj])"
                        )
                if init == "orthogonal":
                    init = True  # peft's orthogonal init needs nn.Linear: done by wrap_model instead
            return peft.LoraConfig(
                task_type=task,
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=target,
                target_parameters=params or None,
                use_dora=cfg.use_dora,
                use_rslora=cfg.use_rslora,
                init_lora_weights=init,
            )
        case "ia3":
            if target == "all-linear":
                # peft 0.21 expands "all-linear" to full module names and then refuses to reload
                # the adapter ("feedforward_modules should be a subset of target_modules"), so
                # the linear layers are named here, by their last name component.
                if model is None:
                    raise AdapterError("IA3 with target_modules [all-linear] needs the model")
                target, ff = _ia3_targets(model)
            else:
                # peft scales the *input* of "feed-forward" modules and the output of the others; as
                # peft's LLaMA default, down_proj is the feed-forward one.
                ff = [m for m in ("down_proj",) if m in target]
            return peft.IA3Config(task_type=task, target_modules=target, feedforward_modules=ff)
        case "prefix":
            return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
        case "prompt":
            return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
        case other:
            raise AdapterError(f"peft.method must be one of {', '.join(METHODS)}, got {other!r}")


def wrap_model(model: nn.Module, cfg: PeftConfig, *, optimizer: str | None = None) -> nn.Module:
    """``peft.get_peft_model(model, ...)``: base weights frozen, adapter parameters trainable.

    ``optimizer`` (its name) chooses the LoRA initialisation when ``peft.init=auto``.

    Raises:
        AdapterError: peft rejects the configuration (e.g. target modules that match nothing,
            prefix tuning with activation checkpointing).
    """
    import peft

    config = build_peft_config(cfg, model, optimizer)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as err:
        raise AdapterError(f"peft.method={cfg.method}: {err}") from None
    if (
        cfg.method == "lora"
        and lora_init(cfg, optimizer) == "orthogonal"
        and config.init_lora_weights is True
    ):
        _orthogonal_init(wrapped)
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise AdapterError(
            f"peft.method={cfg.method} left no trainable parameter (check peft.target_modules)"
        )
    return wrapped


@torch.no_grad()
def _orthogonal_init(model: nn.Module) -> None:
    """peft's orthogonal LoRA init (B != 0, B @ A = 0: the model is unchanged at step 0) for every
    LoRA layer, including peft's ParamWrapper (LoRA on parameters: one A/B pair per expert), which
    peft's own orthogonal init does not handle."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.lora_A:
            if not isinstance(module, ParamWrapper):
                module.orthogonal_init(name)
                continue
            r, experts = module.r[name], module.num_experts
            a, b = module.lora_A[name].weight, module.lora_B[name].weight  # (E*r, in), (out, r*E)
            b_view = b.view(b.shape[0], r, experts)
            for e in range(experts):
                q, _ = torch.linalg.qr(torch.randn(r, r))
                a[e * r : (e + 1) * r] = (torch.randn(a.shape[1], r // 2) @ q[0::2]).T.to(a.dtype) / 10.0
                b_view[:, :, e] = (torch.randn(r // 2, b.shape[0]).T @ q[1::2]).to(b.dtype) / 10.0


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a peft adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_prompt_learning(model: nn.Module) -> bool:
    """Prefix / prompt tuning (virtual tokens, nothing to merge into the weights)."""
    return bool(getattr(model, "_is_prompt_learning", False))


def save_adapter(model: nn.Module, directory: str | Path, *, base: str | Path) -> None:
    """Write the adapter of a peft model to ``directory`` (peft format) recording ``base`` (the
    base model directory) as ``base_model_name_or_path``."""
    model.peft_config[_ADAPTER].base_model_name_or_path = str(Path(base).resolve())
    model.save_pretrained(str(directory), safe_serialization=True)


def save_base(
    model: nn.Module, directory: str | Path, tokenizer: Any | None = None, *, write: bool = True
) -> None:
    """Write the *base* model of a peft model to ``directory`` in HF format (original key names,
    adapter weights left out), so that the adapter can be loaded and merged later.

    Under FSDP2 every rank must call this: the shards are gathered tensor by tensor, and only the
    rank with ``write=True`` keeps and writes them.
    """
    from peft import get_base_model_state_dict

    state = {}
    for key, value in get_base_model_state_dict(model).items():
        full = value.full_tensor() if is_shard(value) else value  # collective: same order on all ranks
        if write:
            state[key] = full.detach().cpu().contiguous()
    if not write:
        return
    model.get_base_model().save_pretrained(str(directory), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _copy_full_into(views: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy the full tensors of ``state`` into ``views`` (views of the model's parameters: plain, or
    FSDP2 shards, which receive their own slice). Every rank must call this with the same keys."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for key in sorted(state):
            dst, src = views[key], state[key]
            if is_shard(dst):
                src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
                dst, src = dst.to_local(), src.to_local()
            dst.copy_(src)


def load_base_weights(model: nn.Module, directory: str | Path) -> None:
    """Load the HF weights of ``directory`` (e.g. ``RUN_DIR/base``) into the base of a peft model."""
    from peft import set_base_model_state_dict
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{directory}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if is_sharded(model):
        from peft import get_base_model_state_dict

        views = get_base_model_state_dict(model)  # detached views of the (sharded) parameters
        unexpected = sorted(set(state) - set(views))
        missing = sorted(set(views) - set(state))
        if not unexpected:
            _copy_full_into(views, {k: v for k, v in state.items() if k in views})
    else:
        missing, unexpected = set_base_model_state_dict(model, state, strict=False)
    tied = {n for n, _ in model.get_base_model().named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.get_base_model().named_parameters()
    }
    missing = [k for k in missing if k not in tied]
    if unexpected or missing:
        raise AdapterError(
            f"{directory}: base weights do not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load ``adapter_model.safetensors`` of ``directory`` into a peft model (on resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS}")
    state = load_file(str(path))
    if is_sharded(model):
        from peft import get_peft_model_state_dict

        # peft's loader copies plain tensors into the parameters, which FSDP2 shards refuse; its
        # state dict of the adapter (file key names) holds views of them instead, filled here.
        views = get_peft_model_state_dict(model, adapter_name=_ADAPTER)
        unexpected = sorted(set(state) - set(views))
        if not unexpected:
            _copy_full_into(views, state)
    else:
        result = set_peft_model_state_dict(model, state, adapter_name=_ADAPTER)
        unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise AdapterError(
            f"{directory}: adapter weights do not match the model (unexpected {unexpected[:5]})"
        )


def resolve_base(adapter_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """The base model directory of an adapter.

    Tries the ``base_model_name_or_path`` recorded in ``adapter_config.json``, then
    ``RUN_DIR/base`` (``run_dir``, or the run the adapter directory sits in: ``RUN/final`` or
    ``RUN/checkpoints/step-N/model``).

    Raises:
        AdapterError: no adapter in ``adapter_dir``, or no base model found.
    """
    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise AdapterError(
            f"{adapter_dir} has no {ADAPTER_CONFIG}: it is not a peft adapter (train with "
            "peft.method=lora|ia3|prefix|prompt to get one)"
        )
    recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    candidates = [Path(recorded)] if recorded else []
    if run_dir is not None:
        candidates.append(Path(run_dir) / BASE_DIR)
    a = adapter_dir.resolve()
    candidates += [a.parent / BASE_DIR, a.parent.parent.parent / BASE_DIR]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise AdapterError(
        f"{adapter_dir}: the base model of this adapter was not found: it records "
        f"{recorded or '(nothing)'} and there is no {BASE_DIR}/ directory in its run. Restore the base "
        f"model there, or set base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG}"
    )


def load_adapter_model(
    adapter_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The base model (see :func:`resolve_base`) with the adapter of ``adapter_dir`` loaded, as a
    ``peft.PeftModel`` in eval mode on the CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = resolve_base(adapter_dir, run_dir)
    if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():  # peft would fall back to a pickled .bin
        raise AdapterError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS}: leantune reads adapter weights only from safetensors "
            "(adapter_model.bin is a pickle, which can run code when loaded)"
        )
    base = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=dtype or "auto",
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def merge_adapter(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    run_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge the adapter of ``adapter_dir`` into its base and write an HF model to ``out``
    (safetensors + config + tokenizer, written atomically with a manifest).

    Raises:
        AdapterError: not an adapter, base not found, or a prefix/prompt adapter (nothing to merge).
    """
    from leantune import checkpoint as ckpt
    from leantune.data import load_tokenizer

    resolve_base(adapter_dir, run_dir)  # fails early, with the reason, before anything is loaded
    kind = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("peft_type", "")
    if kind in _PROMPT_LEARNING:
        raise AdapterError(
            f"{adapter_dir} is a {kind.lower()} adapter: its virtual tokens are inputs, not weights, so "
            "there is nothing to merge. Use the adapter directly (leantune eval / generate accept it)."
        )
    model = load_adapter_model(adapter_dir, run_dir=run_dir, trust_remote_code=trust_remote_code)
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code=trust_remote_code)

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return ckpt.atomic_directory(Path(out), write, meta={"merged_from": str(Path(adapter_dir).resolve())})
