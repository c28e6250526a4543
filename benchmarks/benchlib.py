"""What the benchmark scripts share: where and with which code a result was measured, the worker
subprocess protocol (a worker prints one ``RESULT {json}`` line; the parent reads the last one) with
one run (:func:`run_one`: timeout, thread count, OOM score) or a matrix of named configurations
(:func:`run_matrix`) over it, and the report: ratios, Markdown tables (:func:`render_table`), and
the JSON + Markdown files written atomically (:func:`write_report`).

The scripts import it as a sibling module: ``python benchmarks/X.py`` (and torchrun) put this
directory first on ``sys.path``; the tests add it through pytest's ``pythonpath`` setting.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_PREFIX = "RESULT "


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ram_gib() -> float | None:
    """Total RAM (``MemTotal`` in ``/proc/meminfo``), or None where it cannot be read."""
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("MemTotal")) / 1024**2
    return None


def machine() -> dict[str, Any]:
    """The machine and the main library versions, for a report's provenance."""
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "ram_gib": ram_gib(),
    }


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (rounded), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    """A number for a report table, or an en dash for a missing one."""
    return "–" if x is None else f"{x:{spec}}{suffix}"


def format_load(load: list[float] | None) -> str:
    return "?" if not load else " / ".join(f"{x:.2f}" for x in load)


def load_average() -> str:
    """The load averages now, as :func:`format_load` writes them."""
    return format_load(loadavg())


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing (or ``b`` is 0): a ratio to a reference run that
    failed or was not run."""
    return a / b if a is not None and b else None


def source() -> dict[str, Any]:
    """Which leantune code ran: the package directory, a digest of its sources, and the git commit
    with the uncommitted files under the package when it is a checkout (so a result can be traced
    back even when it was measured on work in progress)."""
    import leantune

    root = Path(leantune.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    info: dict[str, Any] = {"package": str(root), "digest": digest.hexdigest()[:16]}

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.rstrip() if out.returncode == 0 else None  # porcelain lines start with a space

    info["git_commit"] = git("rev-parse", "--short", "HEAD")
    if info["git_commit"] is not None:
        status = git("status", "--porcelain", "--", ".") or ""
        info["uncommitted"] = [line[3:] for line in status.splitlines()]
    return info


def source_note(src: dict[str, Any] | None) -> str:
    """``source()`` as one Markdown list item."""
    if not src:
        return "- Code: unknown."
    where = (
        f"git {src['git_commit']}" if src.get("git_commit") else f"`{src['package']}` (not a git checkout)"
    )
    dirty = src.get("uncommitted")
    if dirty:
        shown = ", ".join(f"`{f}`" for f in dirty[:8]) + (", ..." if len(dirty) > 8 else "")
        where += f" with uncommitted changes in {len(dirty)} file(s) ({shown})"
    return f"- Code: leantune from {where}; source digest `{src['digest']}`."


def work_dir(path: Path | None, name: str) -> tuple[Path, bool]:
    """Where a benchmark's runs go, and whether to keep it: ``path`` (created, kept), or a new
    temporary directory ``leantune-<name>-*`` (the script removes it when done)."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=f"leantune-{name}-")), False
    path.mkdir(parents=True, exist_ok=True)
    return path, True


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a run killed while writing leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(
    out: Path, report: dict[str, Any], markdown: str, *, ensure_ascii: bool = True, indent: int = 2
) -> None:
    """``<out>.json`` (the report, indented) and ``<out>.md`` (``markdown`` as given), each written
    atomically (scripts that rewrite their report after every run keep a readable one if killed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=indent, ensure_ascii=ensure_ascii) + "\n"
    write_atomic(out.with_suffix(".json"), text)
    write_atomic(out.with_suffix(".md"), markdown)


def emit_result(result: Any) -> None:
    """A worker's answer to its parent: one line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables for a worker with ``threads`` CPU threads (OpenMP, MKL) and quiet
    libraries (no tokenizers fork warning, transformers errors only)."""
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }


class WorkerError(RuntimeError):
    """A worker subprocess exited non-zero, was killed, timed out or printed no result."""

    def __init__(self, label: str, reason: str, stderr: str = "", returncode: int | None = None) -> None:
        super().__init__(f"worker {label} {reason}" + (f":\n{stderr[-4000:]}" if stderr else ""))
        self.label = label
        self.reason = reason
        self.stderr = stderr
        self.returncode = returncode

    @property
    def last_line(self) -> str:
        """One line for a progress log: the worker's last stderr line, or the reason (both for a
        worker killed by a signal: its last words rarely say so)."""
        lines = self.stderr.strip().splitlines()
        if self.returncode is not None and self.returncode < 0:
            return self.reason + (f": {lines[-1]}" if lines else "")
        return (lines or [self.reason])[-1]

    @property
    def detail(self) -> str:
        """What a report keeps of the failure: the end of stderr, or the reason."""
        return self.stderr[-3000:] if self.stderr else self.reason


def _oom_score(adj: int) -> Callable[[], None]:
    def preexec() -> None:
        # Raising one's own oom_score_adj needs no privilege: if memory runs out, the kernel's OOM
        # killer takes the benchmark worker rather than some other process on a shared machine.
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(adj))

    return preexec


def exit_reason(returncode: int) -> str:
    """Why a process with this non-zero return code ended, in a few words."""
    if returncode >= 0:
        return f"failed (exit code {returncode})"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")


def run_worker(
    cmd: list[str],
    env: dict[str, str],
    label: str,
    timeout: float | None = None,
    *,
    oom_score_adj: int | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` (stdout and stderr captured) and return its last ``RESULT`` line's JSON, with the
    process's wall time added as ``process_wall_seconds``. Raises :class:`WorkerError`.

    ``oom_score_adj`` is written to the worker's ``/proc/self/oom_score_adj`` (1000: the OOM
    killer's first choice), so that running out of memory kills the benchmark, not a neighbour."""
    preexec = _oom_score(oom_score_adj) if oom_score_adj is not None else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout, preexec_fn=preexec
        )
    except subprocess.TimeoutExpired as err:
        raise WorkerError(label, f"timed out after {timeout:.0f} s") from err
    wall = time.perf_counter() - t0
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if proc.returncode != 0:
        raise WorkerError(label, exit_reason(proc.returncode), proc.stderr, proc.returncode)
    if not lines:
        raise WorkerError(label, "printed no RESULT line", proc.stderr)
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["process_wall_seconds"] = wall
    return result


def run_one(
    worker_script: Path | str,
    params: dict[str, Any],
    *,
    label: str | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    oom_score_adj: int | None = None,
) -> dict[str, Any]:
    """One run of ``python WORKER_SCRIPT --worker JSON`` (``JSON``: ``params``) in a fresh process.

    Args:
        worker_script: a script whose ``--worker JSON`` mode prints one ``RESULT`` line
            (:func:`emit_result`).
        params: the worker's parameters (must be JSON-serialisable).
        label: the run's name in messages (default: ``params["config"]`` or the script's name).
        timeout: seconds before the worker is killed.
        env: variables set in the worker's environment on top of this process's.
        oom_score_adj: see :func:`run_worker`.

    Returns:
        The worker's result (see :func:`run_worker`), or for a run that failed ``{"error": <its
        last stderr line or the exception>, "detail": <more of it>}``: a failure is never raised.
    """
    script = Path(worker_script).resolve()
    label = label or str(params.get("config") or script.stem)
    cmd = [sys.executable, str(script), "--worker", json.dumps(params)]
    try:
        return run_worker(cmd, {**os.environ, **(env or {})}, label, timeout, oom_score_adj=oom_score_adj)
    except WorkerError as err:
        return {"error": err.last_line, "detail": err.detail}
    except Exception as err:  # e.g. a malformed RESULT line: recorded like a failed worker
        return {"error": f"{type(err).__name__}: {err}", "detail": repr(err)}


def run_matrix(
    worker_script: Path,
    configs: dict[str, dict[str, Any]],
    *,
    repeats: int = 1,
    timeout: float | None = None,
    progress: Callable[[str], None] | None = print,
    env: dict[str, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run every named configuration in a fresh ``python WORKER_SCRIPT --worker JSON`` process
    (``JSON``: the configuration's parameters), ``repeats`` rounds interleaved so that a drift in
    machine load hits every configuration alike.

    Args:
        worker_script: a script whose ``--worker JSON`` mode prints one ``RESULT`` line
            (:func:`emit_result`).
        configs: configuration name -> the worker's parameters (must be JSON-serialisable).
        repeats: runs per configuration.
        timeout: seconds per run before the worker is killed.
        progress: called with one line per run (``None``: silent).
        env: variables set in the workers' environment on top of this process's.

    Returns:
        Name -> one dict per run: the worker's result (see :func:`run_worker`), or for a run that
        failed ``{"error": <its last stderr line or the exception>, "detail": <more of it>}``; a
        failure never stops the matrix.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    total, k = len(configs) * repeats, 0
    for r in range(repeats):
        for name, params in configs.items():
            k += 1
            label = name if repeats == 1 else f"{name} (repeat {r + 1}/{repeats})"
            t0 = time.perf_counter()
            result = run_one(worker_script, params, label=label, timeout=timeout, env=env)
            runs[name].append(result)
            if progress is not None:
                status = f"FAILED: {result['error']}" if "error" in result else "ok"
                progress(f"[{k}/{total}] {label}: {status} ({time.perf_counter() - t0:.1f} s)")
    return runs


def render_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub Markdown table, one line per row, ending in a newline.

    ``align`` has one letter per column: ``l`` (left, the default), ``r`` (right: numbers) or
    ``c`` (centre). ``|`` in a cell is escaped and newlines become spaces.
    """
    align = align if align is not None else "l" * len(headers)
    if len(align) != len(headers) or set(align) - set("lrc"):
        raise ValueError(f"align needs one of l/r/c per column ({len(headers)}), got {align!r}")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table {len(headers)} columns: {row!r}")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    rule = {"l": "---", "r": "---:", "c": ":---:"}
    return "\n".join([line(headers), line([rule[a] for a in align]), *map(line, rows)]) + "\n"


def add_run_options(
    ap: argparse.ArgumentParser,
    names: list[str],
    *,
    steps: int,
    warmup: int,
    timeout: float,
    preset: str = "0.37b",
) -> None:
    """The options every step benchmark takes: the model shape (``--preset --seq --batch``), the
    steps (``--steps --warmup``), the rounds (``--repeats``), ``--threads``, ``--timeout``,
    ``--only`` (a subset of ``names``) and the hidden ``--worker JSON`` of :func:`run_matrix`'s
    workers. Check them with :func:`check_run_options`."""
    ap.add_argument("--preset", default=preset, help=f"leantune.models preset (default: {preset})")
    ap.add_argument("--seq", type=int, default=512, help="sequence length (default: 512)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    ap.add_argument("--steps", type=int, default=steps, help=f"timed steps per run (default: {steps})")
    ap.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps first (default: {warmup})")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds, medians (default: 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for all (default: 2)")
    ap.add_argument("--timeout", type=float, default=timeout, help=f"seconds per run (default: {timeout:g})")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(names)}")
    ap.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)


def check_run_options(args: Any) -> None:
    """Exit with a message naming the option when a count from :func:`add_run_options` is out of
    range (``--warmup`` may be 0, the others must be >= 1)."""
    for key in ("seq", "batch", "steps", "repeats", "threads"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")


def parse_only(value: str | None, known: list[str]) -> list[str]:
    """``--only a,b`` as a list of names of ``known`` (all of them when empty); an unknown name
    exits with the closest known one as a hint."""
    if not value:
        return list(known)
    names = [n.strip() for n in value.split(",") if n.strip()]
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SystemExit(f"--only: unknown configuration {n!r}.{hint} Known: {', '.join(known)}")
    return names
