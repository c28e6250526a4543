"""leantune.rss: reading, resetting and trimming this process's resident memory (Linux)."""

from __future__ import annotations

import pytest

from leantune.rss import proc_status_bytes, proc_status_kib, release_free_memory, reset_peak_rss


def test_status_fields_and_a_missing_one():
    rss, peak = proc_status_kib("VmRSS"), proc_status_kib("VmHWM")
    assert rss is not None and peak is not None and 0 < rss <= peak
    assert proc_status_kib("NoSuchField") is None
    assert proc_status_bytes("VmRSS") >= 1024 * rss
    with pytest.raises(RuntimeError, match="no NoSuchField in /proc/self/status"):
        proc_status_bytes("NoSuchField")


def test_reset_brings_the_peak_down_to_the_current_rss():
    block = bytearray(64 * 1024 * 1024)  # raise the peak by ~64 MiB, then free it
    block[::4096] = b"x" * len(block[::4096])
    del block
    release_free_memory()
    before = proc_status_kib("VmHWM")
    if not reset_peak_rss():
        pytest.skip("resetting VmHWM is not permitted here")
    after = proc_status_kib("VmHWM")
    assert after < before - 32 * 1024
