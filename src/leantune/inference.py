"""Loading a trained model for evaluation or generation from whatever path the user gives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoadedModel", "load_for_inference", "resolve_device", "resolve_model_dir"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device.

    Raises:
        ValueError: not a device name, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but CUDA is not available here; use --device cpu")
    return dev


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    model_dir: Path
    run_dir: Path | None
    run_config: Any | None  # the run's leantune Config, when the path belongs to a run


def resolve_model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """The HF model directory (and the run directory, if any) behind ``path``.

    Accepts an HF model directory, a run directory (its ``final/`` model, else its newest valid
    checkpoint), or a checkpoint directory (its ``model/``).
    """
    from leantune.checkpoint import latest_valid_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    if (p / "final" / "config.json").is_file() or (p / "final" / "adapter_config.json").is_file():
        return p / "final", p
    if (p / "checkpoints").is_dir():
        found = latest_valid_checkpoint(p / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"{p} is a run directory without a final model or a valid checkpoint")
        return found / "model", p
    if (p / "model" / "config.json").is_file() or (p / "model" / "adapter_config.json").is_file():
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        return p / "model", run
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        run = p.parent if (p.parent / "config.yaml").is_file() and p.name == "final" else None
        return p, run
    raise FileNotFoundError(
        f"{p} is neither a model directory (config.json) nor a leantune run or checkpoint directory"
    )


def load_for_inference(
    path: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model + tokenizer for ``path`` (see :func:`resolve_model_dir`) in eval mode."""
    import yaml
    from transformers import AutoModelForCausalLM

    from leantune.config import config_from_dict
    from leantune.data import load_tokenizer

    model_dir, run_dir = resolve_model_dir(path)
    run_cfg = None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        run_cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if (model_dir / "adapter_config.json").is_file():
        from leantune.adapters import AdapterError, load_adapter_model

        try:  # base + peft adapter; the base is found as leantune.adapters.resolve_base describes
            model = load_adapter_model(
                model_dir, run_dir=run_dir, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except AdapterError as err:
            raise FileNotFoundError(str(err)) from None
    else:
        from leantune.models import check_model_dir

        check_model_dir(model_dir, "model directory")  # safetensors only: a .bin is a pickle
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype or "auto",
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, model_dir, run_dir, run_cfg)
