"""``leantune train dist.nproc=N``: re-run the same command under ``torchrun`` for the user."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

__all__ = ["maybe_launch"]


def maybe_launch(cfg: Any, argv: list[str]) -> int | None:
    """Start ``torchrun --nproc-per-node N -m leantune <args>`` when ``dist.nproc > 1`` and this
    process is not already part of a torchrun job; returns its exit code, or None to train here."""
    if cfg.dist.nproc <= 1 or "LOCAL_RANK" in os.environ:
        return None
    args = [a for a in argv[1:] if not a.startswith("dist.nproc=")]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={cfg.dist.nproc}",
        "-m",
        "leantune",
        *args,
    ]
    print("leantune: launching " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)
