"""Resident memory of this process on Linux, for measuring peaks: read, reset the peak, trim.

Dependency-free (no torch import), so benchmark parents and workers can use it before anything
heavy is loaded.
"""

from __future__ import annotations

import contextlib

__all__ = ["proc_status_bytes", "proc_status_kib", "reset_peak_rss", "release_free_memory"]


def proc_status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...); None where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes, for code that cannot go on without it.

    Raises:
        RuntimeError: the field is not there (not Linux, or an unknown field).
    """
    kib = proc_status_kib(key)
    if kib is None:
        raise RuntimeError(f"no {key} in /proc/self/status")
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS, so that a later peak
    excludes what came before (e.g. model construction). Linux >= 4.0; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``), so that RSS
    follows the live data rather than the allocator's history."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
