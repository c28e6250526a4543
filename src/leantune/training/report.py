"""What a run prints: the set-up it resolved (:func:`announce`) and its summary (:func:`print_summary`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from leantune.config import render_config
from leantune.data import MixtureStream
from leantune.data.streaming import StreamingStream
from leantune.models import count_parameters, human_count
from leantune.monitor import format_bytes

if TYPE_CHECKING:
    from leantune.trainer import RunSummary, Trainer

__all__ = ["announce", "print_summary"]


def announce(trainer: Trainer, resume_from: Path | None, warning: str | None = None) -> None:
    """The resolved config, the model, loss, data, run directory and distribution (rank 0)."""
    t, cfg, m = trainer, trainer.cfg, trainer.monitor
    if not t.is_main:
        return
    m.print("leantune: resolved config", style="bold")
    m.print(render_config(cfg, comments=False).rstrip())
    n_total = count_parameters(t.model)
    n_train = count_parameters(t.model, trainable_only=True)
    if t.hft is not None:  # fused tensors may train in parts
        n_train = t.hft.report.trainable
    attn = getattr(t.model.config, "_attn_implementation", None) if hasattr(t.model, "config") else None
    how = (
        " (auto: the family has no sdpa)"
        if cfg.model.attn_implementation == "auto" and attn == "eager"
        else ""
    )
    m.print(
        f"model: {human_count(n_total)} parameters ({human_count(n_train)} trainable, "
        f"{n_train / max(n_total, 1):.2%}), {cfg.model.dtype} on {t.device} | "
        f"attention: {attn}{how} | optimizer: {cfg.optim.name}"
    )
    m.print(f"loss: {t.objective.description}")
    if t.allocator_note:
        m.print(f"memory: {t.allocator_note}")
    if t.loss_note:
        m.print(f"warning: train.loss_chunk={cfg.train.loss_chunk}: {t.loss_note}", style="red")
    if cfg.peft.method != "none":
        from leantune.adapters import adapter_notes

        m.print(f"peft: {cfg.peft.method}, {n_train:,} adapter parameters of {n_total:,}")
        for note in adapter_notes(t.model.get_base_model(), cfg.peft):
            m.print(f"peft: {note}")
    if t.hft is not None:
        from leantune.hft import freeze_summary

        m.print(t.hft.summary())
        m.print(f"HFT frozen: input embeddings and (block:projections) {freeze_summary(t.hft.mask)}")
    _announce_data(trainer)
    m.print(f"run directory: {t.run_dir}")
    if t.world_size > 1:
        m.print(
            f"distributed: {t.world_size} ranks ({t.env.backend}), "
            + (f"tensor parallel {t.env.tp} x data parallel {t.env.dp_size}, " if t.env.tp > 1 else "")
            + (f"{t.pipeline.describe()}, " if t.pipeline is not None else "")
            + f"strategy {cfg.dist.strategy}, global batch {t.checkpointer.global_batch} sequences"
        )
    if resume_from is not None:
        m.print(f"resumed from {resume_from} at step {t.step}/{t.total_steps}")
    if warning:
        m.print(f"warning: {warning}")


def _announce_data(trainer: Trainer) -> None:
    m, data, stream = trainer.monitor, trainer.data, trainer.stream
    for line in trainer.objective.data_notes():
        m.print(f"data: {line}")
    if isinstance(stream, StreamingStream):
        m.print(f"data ({stream.fmt}): streaming {', '.join(stream.paths)} "
                f"(~{stream.lines_per_epoch} records, shuffle buffer {stream.buffer_size})")  # fmt: skip
    else:
        m.print(f"data ({data.format}): train {data.train_stats.summary()}")
    if isinstance(stream, MixtureStream):
        sizes = ", ".join(f"{n}: {len(s)} samples, weight {w:.2f}"
                          for n, s, w in zip(stream.names, stream.samples, stream.weights))  # fmt: skip
        m.print(f"data: mixing {sizes}")
    if data.pack_stats is not None:
        m.print(f"data: {data.pack_stats.summary()}, attention kept inside each sample")
    elif data.pack_refused:
        m.print(f"data: not packed ({data.pack_refused}); one sample per sequence")
    if data.eval_stats is not None:
        m.print(f"data: eval {data.eval_stats.summary()}")
    if data.cache_note:
        m.print(f"data: {data.cache_note}")


def print_summary(trainer: Trainer, summary: RunSummary) -> None:
    """The run's summary table: eval loss, accuracy, memory, throughput, where its files are."""
    if not trainer.is_main:
        return
    from rich.table import Table

    met = summary.metrics
    table = Table(title="leantune: run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("steps", f"{summary.steps}")
    if "eval_loss" in met:
        table.add_row("eval loss", f"{met['eval_loss']:.4f}")
        if "eval_ppl" in met:
            table.add_row("perplexity", f"{met['eval_ppl']:.3f}")
    for key, value in met.items():
        if key.startswith("acc/"):
            table.add_row(f"exact match: {key[4:]}", f"{value:.1%}")
    if "acc" in met:
        table.add_row("exact match: all", f"{met['acc']:.1%} of {met['acc_samples']}")
    if "eval_reward_accuracy" in met:
        table.add_row("implicit-reward accuracy", f"{met['eval_reward_accuracy']:.1%}")
    kind = "RSS" if trainer.device.type == "cpu" else "CUDA allocated"
    table.add_row("peak memory", f"{format_bytes(met['peak_mem_bytes'])} ({kind})")
    table.add_row("tokens/s", f"{met['tokens_per_s']:.0f} ({met['train_seconds']:.0f} s training)")
    table.add_row("run directory", str(summary.run_dir))
    if summary.final_dir is not None:
        table.add_row("model (HF format)", str(summary.final_dir))
    plot = summary.run_dir / "plot.png"
    if plot.exists():
        table.add_row("plot", str(plot))
    table.add_row("tensorboard", f"tensorboard --logdir {summary.run_dir.parent}")
    trainer.monitor.show(table)
