"""Test-session settings."""

from __future__ import annotations

import os

import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(int(os.environ.get("LEANTUNE_TEST_THREADS", "1")))

import pytest  # noqa: E402

# The device a numerical test runs on. Every test that takes the ``device`` fixture runs on the CPU
# here and again on CUDA where a GPU is present; the CUDA variants carry the ``cuda`` marker, so
# ``pytest -m cuda`` (what scripts/gpu-check runs) selects exactly them.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (scripts/gpu-check runs these on a GPU)")
    if request.param == "cuda":
        # The oracles compare two identical models bit for bit or to 1e-5: the fused SDPA kernels'
        # backward may accumulate in a different order from run to run, the math kernel does not.
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    return torch.device(request.param)
