"""DPO on two CPU ranks (gloo, torchrun) against one rank on the same global batch.

A preference loss is a mean over pairs, so the mean of two ranks' means over 4 pairs is the mean
over the 8; with the precomputed reference every rank reads the same table.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_multirank import assert_weights_close, final_weights, launch, losses
from tests.integration.test_preference_train import write_pairs

pytestmark = pytest.mark.distributed


def common(data, out):
    return [
        "model.preset=test",
        f"data.train={data}",
        "data.num_eval=8",
        "data.max_length=48",
        "train.objective=dpo",
        "train.max_steps=5",  # 44 training pairs: one epoch of 5 global batches of 8, on 1 or 2 ranks
        "optim.name=adalomo",
        "optim.lr=0.02",
        "optim.warmup_steps=0",
        "eval.every=0",
        "log.every=1",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        f"train.output_dir={out}",
    ]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_on_two_ranks_equals_one_rank(tmp_path, strategy):
    data = write_pairs(tmp_path / "pairs.jsonl")
    launch([*common(data, tmp_path), "train.batch_size=8", "train.run_name=one"], 1)
    launch(
        [*common(data, tmp_path), "train.batch_size=4", f"dist.strategy={strategy}", "train.run_name=two"], 2
    )
    one, two = tmp_path / "one", tmp_path / "two"
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-5, atol=1e-6)
    assert_weights_close(final_weights(two), final_weights(one))
    assert (two / "reference" / "manifest.json").is_file()
