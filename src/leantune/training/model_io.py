"""How a run's model is written and read back, picked once when the run is set up:

* :class:`HfModelIO`: the whole model in HF format (safetensors, config, tokenizer);
* :class:`PeftModelIO`: the adapter only, in peft format, beside the base model it adapts;
* :class:`HftModelIO`: HF format plus the HFT mask history, which a load restores exactly
  (never re-drawn), and the optimizer kept in step with the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from leantune import checkpoint as ckpt
from leantune.config import Config, ConfigError

__all__ = ["HfModelIO", "HftModelIO", "PeftModelIO", "make_model_io", "sync_optimizer_with_mask"]


class HfModelIO:
    """The whole model in HF format."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, run_dir: Path, *, is_main: bool) -> None:
        self.model, self.tokenizer, self.run_dir, self.is_main = model, tokenizer, run_dir, is_main

    def save(self, directory: Path) -> None:
        ckpt.save_model(self.model, self.tokenizer, directory)

    def load(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        """Inverse of :meth:`save` (``optimizer``: kept in step with what is trainable)."""
        ckpt.load_model_weights(self.model, directory)

    def on_step_start(
        self, step: int, epoch_progress: float, optimizer: Any, say: Callable[[str], None]
    ) -> None:
        """Called before every optimizer step (nothing to do for a plain model)."""


class PeftModelIO(HfModelIO):
    """The adapter in peft format; its base is ``model.path``, or for a preset RUN_DIR/base, where
    the random init is written once so that the adapter can be loaded and merged."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, run_dir: Path, *, is_main: bool,
                 model_path: str | None) -> None:  # fmt: skip
        super().__init__(model, tokenizer, run_dir, is_main=is_main)
        self.model_path = model_path

    def base_dir(self) -> Path:
        from leantune import adapters

        if self.model_path:
            return Path(self.model_path).resolve()
        base = self.run_dir / adapters.BASE_DIR
        if not (base / ckpt.MANIFEST).is_file():

            def write(tmp: Path) -> None:
                adapters.save_base(self.model, tmp, self.tokenizer, write=self.is_main)

            ckpt.atomic_directory(base, write)
        return base.resolve()

    def save(self, directory: Path) -> None:
        self.model.peft_config["default"].base_model_name_or_path = str(self.base_dir())
        ckpt.save_model(self.model, self.tokenizer, directory)

    def load(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        from leantune import adapters

        base = self.run_dir / adapters.BASE_DIR
        if (base / "config.json").is_file():
            adapters.load_base_weights(self.model, base)
        adapters.load_adapter_weights(self.model, directory)


class HftModelIO(HfModelIO):
    """HF format plus the HFT mask; ``train.hft_redraw=epoch`` draws a new mask for the first step
    of every epoch."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, run_dir: Path, *, is_main: bool,
                 hft: Any, cfg: Config) -> None:  # fmt: skip
        super().__init__(model, tokenizer, run_dir, is_main=is_main)
        self.hft, self.cfg = hft, cfg

    def save(self, directory: Path) -> None:
        super().save(directory)
        if self.is_main:
            self.hft.state.save(directory)

    def load(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        from leantune.hft import STATE_FILE, load_state

        super().load(directory, optimizer)
        state = load_state(directory)
        if state is None:
            raise ckpt.CheckpointError(f"{directory}: no {STATE_FILE}: the run's HFT mask is unknown")
        self.hft.restore(state)
        sync_optimizer_with_mask(optimizer, self.model, self.hft, self.cfg.optim.name)

    def on_step_start(
        self, step: int, epoch_progress: float, optimizer: Any, say: Callable[[str], None]
    ) -> None:
        if self.cfg.train.hft_redraw != "epoch":
            return
        epoch = math.floor(epoch_progress)
        if epoch == self.hft.mask.redraw:
            return
        self.hft.redraw(epoch, step=step)
        sync_optimizer_with_mask(optimizer, self.model, self.hft, self.cfg.optim.name)
        init = getattr(optimizer, "init_state", None)
        if init is not None:
            init()  # newly trainable tensors get their (zero) state now, as a first update would
        say(f"step {step}: new epoch, {self.hft.summary()}")


def make_model_io(cfg: Config, model: torch.nn.Module, tokenizer: Any, hft: Any, run_dir: Path,
                  *, is_main: bool) -> HfModelIO:  # fmt: skip
    """The model I/O of this run's kind (peft adapters, HFT, or a plain model)."""
    if cfg.peft.method != "none":
        return PeftModelIO(model, tokenizer, run_dir, is_main=is_main, model_path=cfg.model.path)
    if hft is not None:
        return HftModelIO(model, tokenizer, run_dir, is_main=is_main, hft=hft, cfg=cfg)
    return HfModelIO(model, tokenizer, run_dir, is_main=is_main)


def sync_optimizer_with_mask(optimizer: Any, model: torch.nn.Module, hft: Any, optim_name: str) -> None:
    """Fused optimizers hook exactly the trainable tensors and update only the trainable parts of
    fused tensors; others drop the state of frozen tensors (``hft=None``: nothing to do).

    Raises:
        ConfigError: the mask freezes parts of fused tensors and the optimizer updates whole
            tensors in ``step()``.
    """
    if hft is None:
        return
    if hasattr(optimizer, "refresh_hooks"):
        optimizer.refresh_hooks()
        whole = {n: None for n, _ in model.named_parameters() if n not in hft.segments}
        optimizer.set_segments({**whole, **hft.segments})
        return
    if hft.segments:
        from leantune.optim import optimizer_names

        fused = ", ".join(sorted(hft.anatomy.fused)) or "fused tensors"
        twin = f"{optim_name}_in_backward"
        same = (
            f"optim.name={twin} (the same optimizer, stepped in backward), "
            if twin in optimizer_names()
            else ""
        )
        raise ConfigError(
            f"train.hft on {hft.anatomy.family}: {fused} hold several matrices in one tensor, "
            "and HFT freezes some of them inside the update of an optimizer fused into backward; "
            f"optim.name={optim_name} updates whole tensors in step(). Use {same}adalomo or lomo"
        )
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                optimizer.state.pop(p, None)
