"""The training loop: setup -> train -> train_step -> evaluate -> save -> close.

Every optimizer goes through one code path: fused optimizers (AdaLomo, LOMO, ``*_in_backward``)
expose ``backward(loss)`` themselves, ordinary ones are wrapped in :class:`leantune.optim.Stepper`.
A resumed run continues from its checkpoint exactly: model, optimizer state, scheduler, data
position and random states are restored.
"""

from __future__ import annotations

import math
import random
import shlex
import signal
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from leantune import checkpoint as ckpt
from leantune.config import Config, ConfigError, config_diff, config_from_dict, render_config
from leantune.data import BatchStream, Datasets, MixtureStream, build_datasets, load_tokenizer
from leantune.data.packing import packing_is_exact, unpack_rows
from leantune.data.streaming import StreamingStream
from leantune.distributed.runtime import all_agree, all_reduce_sum, init_distributed, run_on_main
from leantune.distributed.strategy import attach_optimizer, wrap_model
from leantune.evaluate import eval_loss, exact_match
from leantune.loss import ChunkedLMLoss, training_loss
from leantune.models import build_model, check_model_dir, count_parameters, human_count, resolve_dtype
from leantune.monitor import Monitor, format_bytes, peak_memory_bytes
from leantune.optim import Stepper, build_optimizer, is_fused, needs_create_graph, resume_refusal

__all__ = ["RunSummary", "Trainer", "TrainingError", "train"]

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
    "dist.cpu_offload",
)


class TrainingError(RuntimeError):
    """The run cannot continue (the message gives the diagnosis)."""


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    final_dir: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


def _as_override(value: Any) -> str:
    """A config value as the right-hand side of a ``key=value`` override."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _build_scheduler(opt: torch.optim.Optimizer, cfg: Config, total_steps: int):
    from torch.optim import lr_scheduler as S

    warm = min(cfg.optim.warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warm, 1)
    final = cfg.optim.min_lr_ratio
    match cfg.optim.scheduler:
        case "constant":
            main = S.ConstantLR(opt, factor=1.0, total_iters=0)
        case "linear":
            main = S.LinearLR(opt, start_factor=1.0, end_factor=max(final, 1e-8), total_iters=rest)
        case "cosine":
            main = S.CosineAnnealingLR(opt, T_max=rest, eta_min=cfg.optim.lr * final)
        case other:
            raise ConfigError(f"optim.scheduler: unknown schedule {other!r}")
    if warm == 0:
        return main
    warmup = S.LinearLR(opt, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    return S.SequentialLR(opt, [warmup, main], milestones=[warm])


class Trainer:
    """Trains a causal LM as described by a :class:`~leantune.config.Config`.

    Example:
        >>> from leantune.config import load_config
        >>> summary = Trainer(load_config(None, ["train.max_steps=100"])).run()
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._stop_signal: int | None = None
        self.rank, self.world_size = 0, 1
        self.is_main = True
        self.last_eval: dict[str, Any] = {}
        self.hft: Any = None  # leantune.hft.HftTracker when train.hft is on
        self.allocator_note: str | None = None  # what `leantune train` did to glibc's allocator

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.env = init_distributed(cfg.dist.strategy, cfg.train.device)
        self.rank, self.world_size, self.is_main = self.env.rank, self.env.world_size, self.env.is_main
        self.device = self.env.device
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        self._check_paths()
        self.tokenizer = load_tokenizer(
            cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
        )
        if cfg.data.cache_dir and self.world_size > 1:

            def fill_cache() -> None:  # on rank 0, before the others read it
                build_datasets(cfg.data, self.tokenizer)

            run_on_main(fill_cache)
        self.data: Datasets = build_datasets(cfg.data, self.tokenizer)
        self.model = self._build_model()
        if self.data.pack_stats is not None and not packing_is_exact(
            self.model, self.device, len(self.tokenizer)
        ):
            # the family's code ignores the position ids in its mask: samples would see each other
            self.data.train, self.data.pack_stats = unpack_rows(self.data.train), None
            self.data.pack_refused = f"{type(self.model).__name__} does not keep packed samples apart"
        # Before sharding: the probe batch runs on the whole model, locally; the head keeps the
        # forward patched in here through fully_shard (which changes its class, not its __dict__).
        o = cfg.optim
        two_pass = is_fused(o.name) and (o.clip_grad_norm is not None or o.loss_scale is not None)
        refuse = (
            "FSDP2 with a measuring backward pass first (optim.clip_grad_norm or optim.loss_scale with "
            "a fused optimizer) crashes inside PyTorch's autograd engine with the chunked loss"
            if cfg.dist.strategy == "fsdp" and self.world_size > 1 and two_pass
            else None
        )
        self.loss_fn, self._loss_note = training_loss(self.model, cfg.train.loss_chunk, refuse=refuse)
        # train_model runs the forward passes (a DDP wrapper for ordinary optimizers under ddp);
        # self.model is the model itself, for evaluation and saving.
        self.train_model = wrap_model(
            self.model,
            cfg.dist.strategy,
            fused=is_fused(cfg.optim.name),
            device=self.device,
            dist_cfg=cfg.dist,
        )
        stream_args = {"seed": cfg.train.seed, "rank": self.rank, "world_size": self.world_size}
        if self.data.stream_paths is not None:
            d = cfg.data
            self.stream: BatchStream | MixtureStream | StreamingStream = StreamingStream(
                self.data.stream_paths, d.format, d.columns, self.tokenizer, max_length=d.max_length,
                overlong=d.overlong, pack=d.pack is not False, batch_size=cfg.train.batch_size,
                pad_id=self.tokenizer.pad_token_id, buffer_size=d.shuffle_buffer,
                skip=0 if d.eval is not None else len(self.data.eval), **stream_args,
            )  # fmt: skip
        elif self.data.weights is not None:
            sources = [(name, unpack_rows(s) if self.data.pack_refused else s)
                       for name, s in (self.data.sources or {}).items()]  # fmt: skip
            self.stream = MixtureStream(
                sources, self.data.weights, cfg.train.batch_size, self.tokenizer.pad_token_id, **stream_args
            )
        else:
            self.stream = BatchStream(
                self.data.train, cfg.train.batch_size, self.tokenizer.pad_token_id, **stream_args
            )
        self.total_steps = cfg.train.max_steps or max(
            1, math.ceil(cfg.train.epochs * self.stream.batches_per_epoch / cfg.train.accumulation_steps)
        )
        self.optimizer, self.stepper = self._build_optimizer()
        attach_optimizer(self.optimizer, cfg.dist.strategy)
        self._sync_optimizer_with_mask()
        self.scheduler = _build_scheduler(self.optimizer, cfg, self.total_steps)
        # Every rank must use rank 0's run directory (its default name is a timestamp).
        self.run_dir, resume_from = run_on_main(self._resolve_run_dir)
        if resume_from is not None:
            self._load(resume_from)
        self.monitor = Monitor(
            self.run_dir,
            self.total_steps,
            enabled=self.is_main,
            progress=cfg.log.progress,
            tensorboard=cfg.log.tensorboard,
            start_step=self.step,
            device=self.device,
        )
        if self.is_main:
            # atomic: a run killed while rewriting it on resume must still resume
            ckpt.write_text_atomic(self.run_dir / "config.yaml", render_config(cfg, comments=False))
        self._announce(resume_from)

    def _check_paths(self) -> None:
        """A missing model or tokenizer directory fails here, before any data is read."""
        m = self.cfg.model
        if m.path is not None:
            check_model_dir(m.path)
        if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
            raise FileNotFoundError(
                f"model.tokenizer {m.tokenizer!r} does not exist: give a directory with a saved tokenizer "
                "(tokenizer.json, tokenizer_config.json), or unset it to use model.path's"
            )

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg.model
        overrides: dict[str, Any] = {}
        if cfg.rope_theta is not None:
            overrides["rope_theta"] = cfg.rope_theta
        if cfg.rope_scaling is not None:
            overrides["rope_scaling"] = cfg.rope_scaling
        attn = "eager" if needs_create_graph(self.cfg.optim.name) else cfg.attn_implementation
        try:
            model = build_model(
                preset=None if cfg.path else cfg.preset,
                path=cfg.path,
                dtype=resolve_dtype(cfg.dtype),
                vocab_size=len(self.tokenizer) if not cfg.path else None,
                seed=self.cfg.train.seed,
                trust_remote_code=cfg.trust_remote_code,
                attn_implementation=attn,
                config_overrides=overrides,
            )
        except ValueError as err:  # e.g. a model.rope_scaling transformers cannot use
            raise ConfigError(f"model: {err}") from None
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = self._adapt_model(model)
        model.to(self.device)
        model.train()
        return model

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        o = self.cfg.optim
        engine: dict[str, Any] = {
            "clip_grad_norm": o.clip_grad_norm,
            "clip_grad_value": o.clip_grad_value,
            "loss_scale": o.loss_scale if o.loss_scale in (None, "dynamic") else float(o.loss_scale),
            "accumulation_steps": self.cfg.train.accumulation_steps,
        }
        kwargs = {"lr": o.lr, "weight_decay": o.weight_decay, **o.kwargs}
        try:
            if is_fused(o.name):
                low = self.cfg.model.dtype in ("bf16", "fp16")
                rounding = ("stochastic" if low else "nearest") if o.rounding == "auto" else o.rounding
                opt = build_optimizer(
                    o.name, self.model, **kwargs, **engine, rounding=rounding, seed=self.cfg.train.seed
                )
                return opt, opt
            # An HFT mask re-drawn per epoch unfreezes tensors later: give the optimizer all of
            # them now (frozen ones get no gradient, hence no state and no update).
            redraws = self.hft is not None and self.cfg.train.hft_redraw == "epoch"
            opt = build_optimizer(o.name, list(self.model.parameters()) if redraws else self.model, **kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"optim: {err}") from None
        return opt, Stepper(opt, create_graph=needs_create_graph(o.name), **engine)

    # ------------------------------------------------- adapters (peft) and HFT
    def _adapt_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap ``model`` with peft adapters (``peft.method``) or apply the HFT mask (``train.hft``)."""
        if self.cfg.peft.method != "none":
            from leantune.adapters import AdapterError, wrap_model

            try:
                return wrap_model(model, self.cfg.peft, optimizer=self.cfg.optim.name)
            except AdapterError as err:
                raise ConfigError(str(err)) from None
        if self.cfg.train.hft:
            from leantune.hft import HftError, HftTracker, load_state

            try:
                self.hft = HftTracker(model, self.cfg.train.hft_seed, load_state(self.cfg.model.path))
            except HftError as err:
                raise ConfigError(str(err)) from None
        return model

    def _peft_base_dir(self) -> Path:
        """The base model of the adapters: ``model.path``, or RUN_DIR/base for a preset, whose random
        init is written there once (HF format) so that the adapter can be loaded and merged."""
        from leantune import adapters

        if self.cfg.model.path:
            return Path(self.cfg.model.path).resolve()
        base = self.run_dir / adapters.BASE_DIR
        if not (base / ckpt.MANIFEST).is_file():

            def write(tmp: Path) -> None:
                adapters.save_base(self.model, tmp, self.tokenizer, write=self.is_main)

            ckpt.atomic_directory(base, write)
        return base.resolve()

    def _save_model(self, directory: Path) -> None:
        """HF format; for peft runs the adapter only (peft format); with HFT also the mask history."""
        if self.cfg.peft.method != "none":
            self.model.peft_config["default"].base_model_name_or_path = str(self._peft_base_dir())
        ckpt.save_model(self.model, self.tokenizer, directory)
        if self.hft is not None and self.is_main:
            self.hft.state.save(directory)

    def _load_model(self, directory: Path) -> None:
        """Inverse of :meth:`_save_model`; restores the saved HFT mask exactly (never re-drawn)."""
        if self.cfg.peft.method != "none":
            from leantune import adapters

            base = self.run_dir / adapters.BASE_DIR
            if (base / "config.json").is_file():
                adapters.load_base_weights(self.model, base)
            adapters.load_adapter_weights(self.model, directory)
        else:
            ckpt.load_model_weights(self.model, directory)
        if self.hft is not None:
            from leantune.hft import STATE_FILE, load_state

            state = load_state(directory)
            if state is None:
                raise ckpt.CheckpointError(f"{directory}: no {STATE_FILE}: the run's HFT mask is unknown")
            self.hft.restore(state)
            self._sync_optimizer_with_mask()

    def _sync_optimizer_with_mask(self) -> None:
        # Fused optimizers hook exactly the trainable tensors and update only the trainable parts
        # of fused tensors; others drop the state of frozen tensors.
        if self.hft is None:
            return
        if hasattr(self.optimizer, "refresh_hooks"):
            self.optimizer.refresh_hooks()
            whole = {n: None for n, _ in self.model.named_parameters() if n not in self.hft.segments}
            self.optimizer.set_segments({**whole, **self.hft.segments})
            return
        if self.hft.segments:
            from leantune.optim import optimizer_names

            fused = ", ".join(sorted(self.hft.anatomy.fused)) or "fused tensors"
            twin = f"{self.cfg.optim.name}_in_backward"
            same = (
                f"optim.name={twin} (the same optimizer, stepped in backward), "
                if twin in optimizer_names()
                else ""
            )
            raise ConfigError(
                f"train.hft on {self.hft.anatomy.family}: {fused} hold several matrices in one tensor, "
                "and HFT freezes some of them inside the update of an optimizer fused into backward; "
                f"optim.name={self.cfg.optim.name} updates whole tensors in step(). Use {same}adalomo or lomo"
            )
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    self.optimizer.state.pop(p, None)

    def _maybe_redraw_hft(self) -> None:
        """``train.hft_redraw=epoch``: a new mask for the first step that starts in a new epoch."""
        if self.hft is None or self.cfg.train.hft_redraw != "epoch":
            return
        epoch = math.floor(self.stream.epoch_progress)
        if epoch == self.hft.mask.redraw:
            return
        self.hft.redraw(epoch, step=self.step)
        self._sync_optimizer_with_mask()
        init = getattr(self.optimizer, "init_state", None)
        if init is not None:
            init()  # newly trainable tensors get their (zero) state now, as a first update would
        self.monitor.print(f"step {self.step}: new epoch, {self.hft.summary()}")

    # ------------------------------------------------------------ run dirs
    def _resolve_run_dir(self) -> tuple[Path, Path | None]:
        t = self.cfg.train
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

    def _check_resume_config(self, run_dir: Path) -> None:
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file():
            return
        saved = config_from_dict(yaml.safe_load(saved_path.read_text()))
        diffs = [
            d
            for d in config_diff(saved, self.cfg)
            if d[0] not in RESUMABLE_CHANGES and not d[0].startswith(("eval.", "log."))
        ]
        if diffs:
            lines = "\n".join(f"  {k}: run has {a!r}, now {b!r}" for k, a, b in diffs)
            raise ConfigError(
                f"cannot resume {run_dir}: its config differs in settings that change the training itself:\n"
                f"{lines}\nUse the run's own settings (see {saved_path}) or start a new run."
            )

    # ----------------------------------------------------------- checkpoints
    def _load(self, path: Path) -> None:
        run_on_main(lambda: self._check_resume_config(self.run_dir))
        refusal = resume_refusal(self.cfg.optim.name)
        if refusal is not None:
            raise ConfigError(
                f"cannot resume {path} with optim.name={self.cfg.optim.name}: {refusal}, so the run "
                "would not continue the same optimization. Start a new run (train.resume unset, or a "
                "new train.run_name), from the saved weights with model.path=<checkpoint>/model if wanted"
            )
        self._load_model(path / "model")
        opt = self.stepper.optimizer if isinstance(self.stepper, Stepper) else self.optimizer
        ckpt.load_optimizer(self.model, opt, path / "optim")
        state = ckpt.load_torch(path / "training_state.pt")
        if state["global_batch"] != self.global_batch:
            raise ConfigError(
                f"cannot resume {path}: it was trained with a global batch of {state['global_batch']} "
                f"sequences (batch_size x ranks x accumulation), now {self.global_batch}; keep it equal "
                "(e.g. double train.batch_size when halving the ranks)"
            )
        self.scheduler.load_state_dict(state["scheduler"])
        per_rank = state["per_rank"]
        mine = per_rank[self.rank] if len(per_rank) == self.world_size else per_rank[0]
        stream = dict(mine.get("data") or state["data"])
        if isinstance(self.stream, (MixtureStream, StreamingStream)):
            if len(per_rank) != self.world_size or state["batch_size"] != self.cfg.train.batch_size:
                raise ConfigError(
                    f"cannot resume {path}: a data mixture or stream resumes on the same number of ranks "
                    f"({len(per_rank)}) and train.batch_size ({state['batch_size']})"
                )
        elif "cursor" in stream:
            stream["cursor"] = (
                stream["cursor"]
                * state["world_size"]
                * state["batch_size"]
                // (self.world_size * self.cfg.train.batch_size)
            )
        self.stream.load_state_dict(stream)
        ckpt.restore_rng(mine["rng"])
        engine = dict(mine["engine"])
        if len(per_rank) != self.world_size and engine.get("generators"):
            self.monitor_warning = (
                f"resuming {len(per_rank)}-rank stochastic-rounding state on {self.world_size} ranks: "
                "rounding noise is re-seeded (the run stays valid but is not bitwise reproducible)"
            )
            engine["generators"] = {}
        self.stepper.load_engine_state_dict(engine)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.resumed_from = path

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.world_size * self.cfg.train.accumulation_steps

    def _gather(self, obj: Any) -> list[Any]:
        from leantune.distributed.runtime import is_distributed

        if not is_distributed():
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def save(self) -> Path:
        """Write a resumable checkpoint of the current step and prune old ones (every rank calls this)."""
        root = self.run_dir / "checkpoints"
        mine = {"rng": ckpt.capture_rng(), "engine": self.stepper.engine_state_dict()}
        if isinstance(self.stream, (MixtureStream, StreamingStream)):
            mine["data"] = self.stream.state_dict()  # each rank's own position
        per_rank = self._gather(mine)
        opt = self.stepper.optimizer if isinstance(self.stepper, Stepper) else self.optimizer

        def write(tmp: Path) -> None:
            self._save_model(tmp / "model")
            ckpt.save_optimizer(self.model, opt, tmp / "optim")
            if not self.is_main:
                return
            ckpt.save_torch(
                {
                    "scheduler": self.scheduler.state_dict(),
                    "data": self.stream.state_dict(),
                    "per_rank": per_rank,
                    "step": self.step,
                    "tokens_seen": self.tokens_seen,
                    "nonfinite_total": self.nonfinite_total,
                    "nonfinite_in_a_row": self.nonfinite_in_a_row,
                    "world_size": self.world_size,
                    "batch_size": self.cfg.train.batch_size,
                    "global_batch": self.global_batch,
                },
                tmp / "training_state.pt",
            )
            (tmp / "trainer_state.json").write_text(
                yaml.safe_dump({"step": self.step, "tokens_seen": self.tokens_seen, "eval": self.last_eval})
            )

        self._refuse_nonfinite_weights("checkpoint")
        try:
            path = ckpt.atomic_directory(
                root / f"{ckpt.PREFIX}{self.step:06d}", write, meta={"step": self.step}
            )
        except ckpt.CheckpointWriteError as err:
            raise TrainingError(self._write_failed(err)) from err
        if self.is_main:
            ckpt.prune_checkpoints(root, self.cfg.train.keep_last)
        return path

    def export(self) -> Path:
        """Write the final model (HF format: safetensors + config + tokenizer; for peft runs the
        adapter in peft format) to RUN_DIR/final."""
        self._refuse_nonfinite_weights("final model")
        try:
            return ckpt.atomic_directory(self.run_dir / "final", self._save_model, meta={"step": self.step})
        except ckpt.CheckpointWriteError as err:
            raise TrainingError(self._write_failed(err)) from err

    def _refuse_nonfinite_weights(self, what: str) -> None:
        """Weights with an inf/nan are never written (every rank calls this)."""
        bad = self._nonfinite_weights()
        if bad:
            raise TrainingError(
                f"refusing to write the {what} of step {self.step}: the weights hold inf/nan "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): an update overflowed "
                f"(optim.lr={self.cfg.optim.lr} too high, or fp16 overflow). Earlier checkpoints are "
                "intact. Resume from the last one with gradient clipping:\n"
                f"  leantune train {self._resume_hint()} optim.clip_grad_norm=1.0\n"
                "or start a new run with a lower optim.lr."
            )

    def _write_failed(self, err: ckpt.CheckpointWriteError) -> str:
        """What a failed save means for the run, and how to go on (local: no collectives)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a skipped newer checkpoint would be reported twice
            previous = ckpt.latest_valid_checkpoint(self.run_dir / "checkpoints")
        kept = (
            f"The newest intact checkpoint is {previous} (verified): nothing up to its step is lost."
            if previous is not None
            else "There is no earlier checkpoint: a new run would start over."
        )
        fix = "Free some disk space" if err.disk_full else "Fix the storage problem"
        return f"{err}.\n{kept}\n{fix}, then resume with:\n  leantune train {self._resume_hint()}"

    # ----------------------------------------------------------------- train
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``accumulation_steps`` micro-batches."""
        losses, tokens, result, lost = [], 0, None, False
        for _ in range(self.cfg.train.accumulation_steps):
            batch = self.stream.next_batch()
            n_tokens = int(batch["attention_mask"].sum())  # host tensor: no device sync
            if n_tokens == batch["attention_mask"].numel() or "position_ids" in batch:
                # No padding: without the (all-ones) mask transformers builds none and SDPA takes
                # its causal path with native grouped-query attention; given the mask, several
                # families (sliding window, fused qkv) materialise an L x L mask in every layer.
                # Packed: the position ids delimit the samples (see leantune.data.packing).
                del batch["attention_mask"]
            batch = {k: v.to(self.device) for k, v in batch.items()}
            tokens += n_tokens
            if lost:
                continue  # this step is already lost; keep the data position exact
            loss = self.loss_fn(self.train_model, batch)
            # One sync per micro-batch: the mean loss over ranks, and whether any rank's is not
            # finite (then every rank skips together, or the collectives would deadlock).
            local = [
                loss.detach().float(),
                (~torch.isfinite(loss)).float(),
                torch.tensor(float(n_tokens), device=loss.device),
            ]
            stats = all_reduce_sum(torch.stack(local)).tolist()
            losses.append(stats[0] / self.world_size)
            tokens += int(stats[2]) - int(local[2])  # count every rank's tokens
            if stats[1] > 0:
                lost = True
                losses[-1] = float("nan")
                self.stepper.zero_grad()  # drop a partial accumulation: never step on NaN
                continue
            result = self.stepper.backward(loss)
        skipped = lost or result is None or result.skipped
        self.scheduler.step()
        return {
            "loss": sum(losses) / len(losses),
            "tokens": tokens,
            "skipped": skipped,
            # fused optimizers without a measuring pass: a tensor's inf/nan gradient was zeroed
            "zeroed": not skipped and bool(getattr(result, "zeroed", False)),
            "grad_norm": None if result is None else result.grad_norm,
        }

    def _handle_nonfinite(self, out: dict[str, Any]) -> None:
        if not (out["skipped"] or out.get("zeroed")):
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        what = (
            f"skipped: non-finite {'loss' if not math.isfinite(out['loss']) else 'gradient'}"
            if out["skipped"]
            else "had a non-finite gradient in some tensors: they got a zero gradient, the rest updated"
        )
        self.monitor.print(
            f"warning: step {self.step} {what} "
            f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)"
        )
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
            bad = self._nonfinite_weights()
            state = (
                f"The weights are no longer finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                "an update overflowed before these steps; nothing non-finite was saved."
                if bad
                else "No inf/nan reached the weights (skipped steps changed nothing; tensors with a "
                "non-finite gradient got a zero one)."
            )
            raise TrainingError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient "
                f"(last at step {self.step}, train.max_nonfinite={self.cfg.train.max_nonfinite}). "
                f"{state} Likely causes: learning rate too high (optim.lr={self.cfg.optim.lr}), fp16 "
                "overflow, or bad data. Resume from the last checkpoint with gradient clipping (it may "
                f"change on resume):\n  leantune train {self._resume_hint()} optim.clip_grad_norm=1.0\n"
                "or start a new run with a lower optim.lr (or model.dtype=bf16 instead of fp16)."
            )

    def _nonfinite_weights(self) -> list[str]:
        """Names of the parameters holding an inf/nan (every rank calls this; one host sync)."""
        named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in self.model.named_parameters()]
        flags = torch.stack([(~torch.isfinite(t.detach())).any().to(self.device) for _, t in named])
        flags = all_reduce_sum(flags.float()).tolist()
        return [n for (n, _), f in zip(named, flags) if f > 0]

    def evaluate(self) -> dict[str, Any]:
        """Eval loss, perplexity and exact-match accuracy on the evaluation set."""
        e = self.cfg.eval
        if not self.data.eval:
            return {}
        values = eval_loss(
            self.model,
            self.data.eval,
            batch_size=self.cfg.train.batch_size,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            max_batches=e.max_batches,
            rank=self.rank,
            world_size=self.world_size,
            loss=self.loss_fn if isinstance(self.loss_fn, ChunkedLMLoss) else None,
        )
        if e.accuracy_samples and self.is_main:
            values.update(
                exact_match(
                    self.model,
                    self.tokenizer,
                    self.data.eval,
                    device=self.device,
                    max_new_tokens=e.max_new_tokens,
                    limit=e.accuracy_samples,
                )
            )
        self.last_eval = values
        return values

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self._stop_signal = signum

    def train(self) -> RunSummary:
        cfg = self.cfg
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        window: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        run_t0, run_tokens, run_start_step = t0, 0, self.step
        paused = 0.0  # seconds spent evaluating and saving: not training throughput
        try:
            while self.step < self.total_steps:
                self._maybe_redraw_hft()
                out = self.train_step()
                self.step += 1
                self.tokens_seen += out["tokens"]
                run_tokens += out["tokens"]
                self._handle_nonfinite(out)
                window.append(out)
                if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - t0
                    toks = sum(o["tokens"] for o in window)
                    finite = [o["loss"] for o in window if math.isfinite(o["loss"])]
                    norms = [o["grad_norm"] for o in window if o["grad_norm"] is not None]
                    values = {
                        "loss": sum(finite) / len(finite) if finite else float("nan"),
                        # float(): torchao's optimizers keep lr as a tensor
                        "lr": float(self.optimizer.param_groups[0]["lr"]),
                        "tokens_per_s": toks / elapsed,
                        "tokens_per_s_per_device": toks / elapsed / self.world_size,
                        "peak_mem_bytes": peak_memory_bytes(self.device),
                        "epoch": self.stream.epoch_progress,
                        "skipped_steps": self.nonfinite_total,
                    }
                    if norms:
                        values["grad_norm"] = sum(norms) / len(norms)
                    self.monitor.log_train(self.step, values)
                    window, t0 = [], time.perf_counter()
                else:
                    self.monitor.advance(self.step)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                    t_pause = time.perf_counter()
                    self.monitor.log_eval(self.step, self.evaluate())
                    t0 = time.perf_counter()  # evaluation time is not training throughput
                    paused += t0 - t_pause
                if (
                    cfg.train.save_every
                    and self.step % cfg.train.save_every == 0
                    and self.step < self.total_steps
                ):
                    t_pause = time.perf_counter()
                    self.save()
                    t0 = time.perf_counter()
                    paused += t0 - t_pause
                if all_agree(self._stop_signal is not None, self.device):
                    path = self.save()
                    name = signal.Signals(self._stop_signal or signal.SIGTERM).name
                    self.monitor.print(
                        f"\n{name} received: saved {path} at step {self.step}. Resume with:\n"
                        f"  leantune train {self._resume_hint()}"
                    )
                    return RunSummary(self.run_dir, self.step, None, {}, interrupted=True)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        train_time = time.perf_counter() - run_t0 - paused
        metrics = self.evaluate()
        if metrics:
            self.monitor.log_eval(self.step, metrics)
        metrics["tokens_per_s"] = run_tokens / max(train_time, 1e-9)
        metrics["peak_mem_bytes"] = peak_memory_bytes(self.device)
        metrics["train_seconds"] = train_time
        metrics["steps_this_run"] = self.step - run_start_step
        if isinstance(self.stream, MixtureStream):
            metrics["data_mixture"] = self.stream.realised()
            self.monitor.print(self.stream.describe())
        self.monitor.record("summary", self.step, metrics)
        self.save()
        final = self.export()
        return RunSummary(self.run_dir, self.step, final, metrics)

    def _resume_hint(self) -> str:
        """The arguments of ``leantune train`` that resume this run: its settings (the CLI's YAML
        file and overrides, else every non-default setting) plus the resume keys."""
        where = ("train.resume", "train.run_name", "train.output_dir")
        path = getattr(self, "config_path", None)
        overrides = getattr(self, "overrides", None)
        if overrides is None:
            overrides = [f"{k}={_as_override(v)}" for k, _, v in config_diff(Config(), self.cfg)]
        settings = [o for o in overrides if o.split("=", 1)[0].strip() not in where]
        resume = [
            "train.resume=auto",
            f"train.run_name={self.run_dir.name}",
            f"train.output_dir={self.run_dir.parent}",  # also right after train.resume=<a run dir>
        ]
        return shlex.join([*([path] if path else []), *settings, *resume])

    # ----------------------------------------------------------------- close
    def _announce(self, resume_from: Path | None) -> None:
        m = self.monitor
        if not self.is_main:
            return
        m.print("leantune: resolved config", style="bold")
        m.print(render_config(self.cfg, comments=False).rstrip())
        n_total = count_parameters(self.model)
        n_train = count_parameters(self.model, trainable_only=True)
        if self.hft is not None:  # fused tensors may train in parts
            n_train = self.hft.report.trainable
        attn = (
            getattr(self.model.config, "_attn_implementation", None)
            if hasattr(self.model, "config")
            else None
        )
        how = (
            " (auto: the family has no sdpa)"
            if self.cfg.model.attn_implementation == "auto" and attn == "eager"
            else ""
        )
        m.print(
            f"model: {human_count(n_total)} parameters ({human_count(n_train)} trainable, "
            f"{n_train / max(n_total, 1):.2%}), {self.cfg.model.dtype} on {self.device} | "
            f"attention: {attn}{how} | optimizer: {self.cfg.optim.name}"
        )
        m.print(f"loss: {self.loss_fn.description}")
        if self.allocator_note:
            m.print(f"memory: {self.allocator_note}")
        if self._loss_note:
            m.print(f"warning: train.loss_chunk={self.cfg.train.loss_chunk}: {self._loss_note}", style="red")
        if self.cfg.peft.method != "none":
            from leantune.adapters import adapter_notes

            m.print(f"peft: {self.cfg.peft.method}, {n_train:,} adapter parameters of {n_total:,}")
            for note in adapter_notes(self.model.get_base_model(), self.cfg.peft):
                m.print(f"peft: {note}")
        if self.hft is not None:
            from leantune.hft import freeze_summary

            m.print(self.hft.summary())
            m.print(f"HFT frozen: input embeddings and (block:projections) {freeze_summary(self.hft.mask)}")
        if isinstance(self.stream, StreamingStream):
            st = self.stream
            m.print(f"data ({st.fmt}): streaming {', '.join(st.paths)} "
                    f"(~{st.lines_per_epoch} records, shuffle buffer {st.buffer_size})")  # fmt: skip
        else:
            m.print(f"data ({self.data.format}): train {self.data.train_stats.summary()}")
        if isinstance(self.stream, MixtureStream):
            sizes = ", ".join(f"{n}: {len(s)} samples, weight {w:.2f}" for n, s, w in
                              zip(self.stream.names, self.stream.samples, self.stream.weights))  # fmt: skip
            m.print(f"data: mixing {sizes}")
        if self.data.pack_stats is not None:
            m.print(f"data: {self.data.pack_stats.summary()}, attention kept inside each sample")
        elif self.data.pack_refused:
            m.print(f"data: not packed ({self.data.pack_refused}); one sample per sequence")
        if self.data.eval_stats is not None:
            m.print(f"data: eval {self.data.eval_stats.summary()}")
        if self.data.cache_note:
            m.print(f"data: {self.data.cache_note}")
        m.print(f"run directory: {self.run_dir}")
        if self.world_size > 1:
            m.print(
                f"distributed: {self.world_size} ranks ({self.env.backend}), strategy "
                f"{self.cfg.dist.strategy}, global batch {self.global_batch} sequences"
            )
        if resume_from is not None:
            m.print(f"resumed from {resume_from} at step {self.step}/{self.total_steps}")
        if getattr(self, "monitor_warning", None):
            m.print(f"warning: {self.monitor_warning}")

    def print_summary(self, summary: RunSummary) -> None:
        if not self.is_main:
            return
        from rich.table import Table

        met = summary.metrics
        table = Table(title="leantune: run summary", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        table.add_row("steps", f"{summary.steps}")
        if "eval_loss" in met:
            table.add_row("eval loss", f"{met['eval_loss']:.4f}")
            table.add_row("perplexity", f"{met['eval_ppl']:.3f}")
        for key, value in met.items():
            if key.startswith("acc/"):
                table.add_row(f"exact match: {key[4:]}", f"{value:.1%}")
        if "acc" in met:
            table.add_row("exact match: all", f"{met['acc']:.1%} of {met['acc_samples']}")
        table.add_row(
            "peak memory",
            f"{format_bytes(met['peak_mem_bytes'])} "
            f"({'RSS' if self.device.type == 'cpu' else 'CUDA allocated'})",
        )
        table.add_row("tokens/s", f"{met['tokens_per_s']:.0f} ({met['train_seconds']:.0f} s training)")
        table.add_row("run directory", str(summary.run_dir))
        if summary.final_dir is not None:
            table.add_row("model (HF format)", str(summary.final_dir))
        plot = summary.run_dir / "plot.png"
        if plot.exists():
            table.add_row("plot", str(plot))
        table.add_row("tensorboard", f"tensorboard --logdir {summary.run_dir.parent}")
        self.monitor._console.print(table)

    def close(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()
        from leantune.distributed.runtime import is_distributed

        if is_distributed():
            import torch.distributed as dist

            # Every rank must be done (rank 0 plots and prints last) before the group goes away:
            # tearing it down under a peer still using it aborts that peer.
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()

    def run(self) -> RunSummary:
        """setup -> train -> plot -> close, printing a summary."""
        try:
            self.setup()
            summary = self.train()
            if self.is_main and self.cfg.log.plot and not summary.interrupted:
                from leantune.plot import plot_run

                plot_run(self.run_dir)
            if not summary.interrupted:
                self.print_summary(summary)
            return summary
        finally:
            self.close()


def train(cfg: Config) -> RunSummary:
    """Train with ``cfg`` and return the summary (see :class:`Trainer`)."""
    return Trainer(cfg).run()
