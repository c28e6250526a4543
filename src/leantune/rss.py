"""Resident memory of this process on Linux, for measuring peaks: read, reset the peak, trim.

Dependency-free (no torch import), so benchmark parents and workers can use it before anything
heavy is loaded.
"""

from __future__ import annotations

import contextlib

__all__ = [
    "MMAP_THRESHOLD",
    "fix_mmap_threshold",
    "proc_status_bytes",
    "proc_status_kib",
    "release_free_memory",
    "reset_peak_rss",
]

MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves an allocation by its own ``mmap`` when leantune fixes the threshold.
1 MiB: the peak RSS of a 1B bf16 step was the same as with 64 KiB (the threshold the estimator was
validated with), and the default job ran at 0.87x glibc's speed instead of 0.52x
(``benchmarks/results/allocator.md``)."""
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc's malloc.h


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


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> str:
    """Keep glibc from holding freed tensors: serve every allocation of ``threshold`` bytes or more
    by its own ``mmap`` (returned to the OS when freed), as ``MALLOC_MMAP_THRESHOLD_`` would.

    glibc's default threshold starts at 128 KiB and rises to the largest block freed so far (up to
    32 MiB); from then on tensors below it come from the heap, and the heap keeps what they freed:
    resident memory grows 9-19% above the live tensors over the first steps. A fixed threshold
    also switches that adaptation off. Returns what was done, for the run log: nothing where
    ``MALLOC_MMAP_THRESHOLD_`` is set already (the user's choice) or the C library is not glibc.
    """
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return f"glibc: MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} (set by you)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator: not glibc, left as it is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, int(threshold)) != 1:
        return "allocator: glibc refused a fixed mmap threshold, left as it is"
    size = f"{threshold >> 20} MiB" if threshold % (1 << 20) == 0 else f"{threshold >> 10} KiB"
    return f"glibc mmap threshold fixed at {size} (freed tensors go back to the OS)"
