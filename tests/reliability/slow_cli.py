"""``leantune`` with slow checkpoint writes, so that a test can kill it in the middle of one.

Run as ``python tests/reliability/slow_cli.py train ...``. Each stage of a checkpoint write (model,
optimizer, training state, the fsync of every file before the manifest) first sleeps
``LEANTUNE_TEST_WRITE_DELAY`` seconds (default 0.1). Nothing else changes: the library has no
test hook; this wrapper patches ``leantune.checkpoint`` before starting the CLI.
"""

from __future__ import annotations

import os
import sys
import time

from leantune import checkpoint


def _slow(fn):
    delay = float(os.environ.get("LEANTUNE_TEST_WRITE_DELAY", "0.1"))

    def wrapper(*args, **kwargs):
        time.sleep(delay)
        return fn(*args, **kwargs)

    return wrapper


for _name in ("save_model", "save_optimizer", "save_torch", "_fsync_file"):
    setattr(checkpoint, _name, _slow(getattr(checkpoint, _name)))

if __name__ == "__main__":
    from leantune.cli import main

    sys.exit(main())
