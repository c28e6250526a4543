"""Where a run lives, which checkpoint it resumes from, and the command that resumes it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from leantune import checkpoint as ckpt
from leantune.config import Config, ConfigError, config_diff, config_from_dict

__all__ = ["RESUMABLE_CHANGES", "CommandLine", "as_override", "check_resume_config", "resolve_run_dir",
           "resume_hint"]  # fmt: skip

# Settings that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.resume",
    "train.run_name",
    "train.output_dir",
    "train.save_every",
    "train.keep_last",
    "train.device",
    "train.max_nonfinite",
    "train.loss_chunk",  # the same loss, a chunk at a time: a way to fit a resumed run
    "train.fix_mmap_threshold",
    "optim.clip_grad_norm",  # not part of any saved state: a way past loss spikes on resume
    "optim.clip_grad_value",
    "train.batch_size",  # allowed when the global batch stays the same (checked on load)
    "dist.nproc",
    "dist.strategy",
    "dist.tp",  # the same model split otherwise: weights and optimizer state reshard on load
    "dist.pp",
    "dist.pp_schedule",  # the same gradients in another order of micro-batches
    "dist.cpu_offload",
)


@dataclass(frozen=True)
class CommandLine:
    """How ``leantune train`` was called: the YAML file and the overrides, repeated in the hints
    that say how to resume."""

    path: str | None = None
    overrides: list[str] = field(default_factory=list)


def as_override(value: Any) -> str:
    """A config value as the right-hand side of a ``key=value`` override."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def resolve_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (``None``: start fresh).

    Raises:
        ConfigError: a fresh run would write into a directory that holds checkpoints, or
            ``train.resume`` names no directory or one without a valid checkpoint.
    """
    t = cfg.train
    root = Path(t.output_dir)
    if t.resume is None:
        run_dir = root / (t.run_name or datetime.now().strftime("%Y%m%d-%H%M%S"))
        if ckpt.find_checkpoints(run_dir / "checkpoints"):
            raise ConfigError(
                f"{run_dir} already holds checkpoints: resume it with train.resume=auto "
                f"(and train.run_name={run_dir.name}), or pick another train.run_name"
            )
        return run_dir, None
    if t.resume == "auto":
        if t.run_name:
            run_dir = root / t.run_name
        else:
            runs = [p for p in root.glob("*") if (p / "checkpoints").is_dir()] if root.is_dir() else []
            run_dir = (
                max(runs, key=lambda p: p.stat().st_mtime)
                if runs
                else root / datetime.now().strftime("%Y%m%d-%H%M%S")
            )
        found = ckpt.latest_valid_checkpoint(run_dir / "checkpoints")
        return run_dir, found  # nothing to resume yet: start fresh in run_dir
    run_dir = Path(t.resume)
    if not run_dir.is_dir():
        raise ConfigError(f"train.resume: {run_dir} is not a directory")
    found = ckpt.latest_valid_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise ConfigError(f"train.resume: {run_dir} has no valid checkpoint to resume from")
    return run_dir, found


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` with settings that change the training itself.

    Raises:
        ConfigError: listing every such difference from the run's saved ``config.yaml``.
    """
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = config_from_dict(yaml.safe_load(saved_path.read_text()))
    diffs = [
        d
        for d in config_diff(saved, cfg)
        # serving changes nothing in the training (and its saved api_key is hidden)
        if d[0] not in RESUMABLE_CHANGES and not d[0].startswith(("eval.", "log.", "serve."))
    ]
    if diffs:
        lines = "\n".join(f"  {k}: run has {a!r}, now {b!r}" for k, a, b in diffs)
        raise ConfigError(
            f"cannot resume {run_dir}: its config differs in settings that change the training itself:\n"
            f"{lines}\nUse the run's own settings (see {saved_path}) or start a new run."
        )


def resume_hint(cfg: Config, run_dir: Path, origin: CommandLine | None = None) -> str:
    """The arguments of ``leantune train`` that resume this run: its settings (the command line's
    YAML file and overrides, else every non-default setting) plus the resume keys."""
    where = ("train.resume", "train.run_name", "train.output_dir")
    if origin is None:
        path, overrides = None, [f"{k}={as_override(v)}" for k, _, v in config_diff(Config(), cfg)]
    else:
        path, overrides = origin.path, origin.overrides
    settings = [o for o in overrides if o.split("=", 1)[0].strip() not in where]
    resume = [
        "train.resume=auto",
        f"train.run_name={run_dir.name}",
        f"train.output_dir={run_dir.parent}",  # also right after train.resume=<a run dir>
    ]
    return shlex.join([*([path] if path else []), *settings, *resume])
