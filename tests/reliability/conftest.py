"""Fixtures of the reliability tests."""

from __future__ import annotations

import os
import random
import zlib

import pytest

from tests.reliability.common import run_args, train_in_process


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """``reference(optimizer)``: the run directory of an uninterrupted run (made once, in process)."""
    out = tmp_path_factory.mktemp("reference")
    done: dict[str, object] = {}

    def get(optimizer: str):
        if optimizer not in done:
            train_in_process(run_args(optimizer, out, optimizer))
            done[optimizer] = out / optimizer
        return done[optimizer]

    return get


@pytest.fixture
def fault_rng(request):
    """A seeded RNG for fault points. The seed is derived from the test's id, so a failure repeats
    on the next run as it is; ``LEANTUNE_FAULT_SEED=<n>`` sets another one (to explore other fault
    points). Printed either way (``pytest -s``) and recorded in the test report."""
    seed = int(os.environ.get("LEANTUNE_FAULT_SEED", zlib.crc32(request.node.nodeid.encode()) % 1_000_000))
    print(f"\n[{request.node.name}] fault seed {seed} (rerun with LEANTUNE_FAULT_SEED={seed})")
    request.node.user_properties.append(("fault_seed", seed))
    return random.Random(seed)
