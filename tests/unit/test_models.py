"""Model presets and construction."""

from __future__ import annotations

import pytest
import torch

from leantune import models
from leantune.models import PRESETS, approx_parameters, build_model, count_parameters


@pytest.mark.parametrize("name", ["test", "tiny"])
def test_preset_parameter_count_matches_the_built_model(name):
    model = build_model(preset=name, vocab_size=263)
    assert count_parameters(model) == approx_parameters(name, 263)


def test_large_presets_are_initialised_in_their_weight_dtype(monkeypatch):
    # An 8B bf16 preset must not pass through a 32 GB fp32 copy: above the threshold the
    # parameters are created in bf16 directly (threshold lowered here to use a tiny preset).
    seen = []
    original = torch.nn.Linear.reset_parameters

    def spy(self):
        seen.append(self.weight.dtype)
        original(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    monkeypatch.setattr(models, "LOW_PRECISION_INIT_PARAMS", 0)
    a = build_model(preset="test", dtype=torch.bfloat16, seed=3)
    assert set(seen) == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    b = build_model(preset="test", dtype=torch.bfloat16, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    seen.clear()
    monkeypatch.setattr(models, "LOW_PRECISION_INIT_PARAMS", 10**12)
    build_model(preset="test", dtype=torch.bfloat16, seed=3)
    assert set(seen) == {torch.float32}  # small presets: fp32 init then cast


def test_unknown_preset_and_missing_directory_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown model preset '7bb'\. Did you mean '7b'\?"):
        build_model(preset="7bb")
    with pytest.raises(FileNotFoundError):
        build_model(path=tmp_path / "nope")
    with pytest.raises(ValueError, match="exactly one"):
        build_model()


def test_presets_have_the_documented_sizes():
    assert round(approx_parameters("8b") / 1e9, 2) == 8.03
    assert round(approx_parameters("7b") / 1e9, 2) == 6.74
    assert set(PRESETS) >= {"tiny", "0.1b", "0.37b", "1b", "7b", "8b", "13b", "70b"}
