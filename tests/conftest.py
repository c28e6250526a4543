"""Test-session settings."""

from __future__ import annotations

import os

import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(int(os.environ.get("LEANTUNE_TEST_THREADS", "1")))
