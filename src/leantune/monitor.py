"""What a run shows and records: progress bar, metrics file, TensorBoard, memory and throughput.

* console: a live ``rich`` progress bar (step, loss, lr, tokens/s, memory); plain log lines when
  the output is not a terminal (CI, files);
* ``metrics.jsonl``: one JSON object per log or eval event (read by ``leantune plot``);
* TensorBoard event files under ``RUN_DIR/tb`` (``tensorboard --logdir runs``).

Only the main process (rank 0) writes or prints.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["Monitor", "peak_memory_bytes", "current_memory_bytes", "format_bytes"]


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory so far: ``max_memory_allocated`` on CUDA, peak RSS of the process on CPU."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def current_memory_bytes(device: torch.device | None = None) -> int:
    """Memory in use now: allocated CUDA memory, or the resident set size on CPU."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_memory_bytes(device)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


class Monitor:
    """Console, JSONL and TensorBoard logging for one run.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tb/`` are written there).
        total_steps: optimizer steps of the run (for the progress bar).
        enabled: False on ranks other than 0 (nothing is printed or written).
        progress: show a progress bar.
        tensorboard: write TensorBoard events.
        start_step: first step (when resuming): later records are dropped from the files.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        enabled: bool = True,
        progress: bool = True,
        tensorboard: bool = True,
        start_step: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.enabled = enabled
        self.device = device
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._bar = None
        self._task = None
        self._tb = None
        self._console = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._metrics = self.metrics_path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None
            )
        from rich.console import Console

        self._console = Console(stderr=False, highlight=False)
        self._live = progress and self._console.is_terminal
        if self._live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self._console,
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
            self._bar.start()

    def _truncate_after(self, step: int) -> None:
        # A resumed run replays the steps after its checkpoint: drop their old records.
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if rec.get("step", 0) <= step:
                kept.append(line)
        from leantune.checkpoint import write_text_atomic

        # atomic: a kill during this rewrite must not lose the log of the steps that are kept
        write_text_atomic(self.metrics_path, "".join(k + "\n" for k in kept))

    def print(self, text: str = "", *, style: str | None = None) -> None:
        if not self.enabled:
            return
        if self._console is not None:
            self._console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text)

    def show(self, renderable: Any) -> None:
        """Print a rich renderable (e.g. a table) on the run's console."""
        if self.enabled and self._console is not None:
            self._console.print(renderable)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": time.time(), **values}
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def log_train(self, step: int, values: dict[str, Any]) -> None:
        self.record("train", step, values)
        if not self.enabled:
            return
        info = (
            f"loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
            f"{_fmt_rate(values['tokens_per_s'])} tok/s | "
            f"mem {format_bytes(values['peak_mem_bytes'])}"
        )
        if "reward" in values:  # PPO
            info += f" | reward {values['reward']:.3f} | kl {values['kl']:.3f}"
            info += f" | len {values['response_len']:.1f} | entropy {values['entropy']:.2f}"
            info += f" | value loss {values['value_loss']:.3f} | clipped {values['clipfrac']:.0%}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            width = len(str(self.total_steps))
            print(f"step {step:>{width}}/{self.total_steps} | {info}", flush=True)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        self.record("eval", step, values)
        parts = [f"eval loss {values['eval_loss']:.4f}"] if "eval_loss" in values else []
        if "eval_reward" in values:
            parts.append(f"held-out reward {values['eval_reward']:.3f} (solved {values['eval_solved']:.1%})")
        if "eval_ppl" in values:
            parts.append(f"ppl {values['eval_ppl']:.3f}")
        if "eval_reward_accuracy" in values:
            parts.append(f"reward accuracy {values['eval_reward_accuracy']:.1%}")
            parts.append(f"margin {values['eval_rewards/margins']:.3f}")
        parts += [f"{k[4:]} {v:.1%}" for k, v in values.items() if k.startswith("acc/")]
        self.print(f"step {step}: " + " | ".join(parts))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._metrics.close()
        sys.stdout.flush()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (torn lines are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a leantune run directory?")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
