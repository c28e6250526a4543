"""Golden loss curves: the first 8 losses of the default job (``leantune train`` with nothing set:
the ``tiny`` preset on the four built-in tasks) per optimizer, against values recorded in
``tests/golden/default_job.json``, rtol 1e-4.

Numeric drift anywhere in the stack (data generation, tokenizer, model init, loss, optimizer,
schedule, rounding) moves these numbers. The run is the default job cut to 8 steps, each one
logged; only ``train.max_steps``, ``log.every`` and what leaves no trace in the losses (no plot,
no tensorboard, no final evaluation) differ from the defaults.

After a deliberate numeric change, rewrite the file and say why in the commit::

    LEANTUNE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/integration/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers

from leantune.config import load_config
from leantune.trainer import Trainer

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "default_job.json"
STEPS = 8
RTOL = 1e-4
OPTIMIZERS = ("adalomo", "lomo", "adamw")


def default_job_losses(optimizer: str, out: Path) -> list[float]:
    args = [
        f"optim.name={optimizer}",
        f"train.max_steps={STEPS}",
        "log.every=1",
        "train.device=cpu",
        "eval.every=0",
        "eval.accuracy_samples=0",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        f"train.output_dir={out}",
        f"train.run_name={optimizer}",
    ]
    cfg = load_config(None, args)
    assert cfg.optim.lr == load_config(None, [f"optim.name={optimizer}"]).optim.lr  # the default lr
    Trainer(cfg).run()
    rows = [json.loads(x) for x in (out / optimizer / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def golden() -> dict:
    if os.environ.get("LEANTUNE_UPDATE_GOLDEN") or not GOLDEN.is_file():
        return {}
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_default_job_loss_curve_equals_the_recorded_one(tmp_path, golden, optimizer):
    losses = default_job_losses(optimizer, tmp_path)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    if os.environ.get("LEANTUNE_UPDATE_GOLDEN"):
        data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        data["_recorded_with"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        data[optimizer] = losses
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=2) + "\n")
        pytest.skip(f"recorded {GOLDEN.name}[{optimizer}]")
    assert optimizer in golden, f"no golden curve for {optimizer}: run with LEANTUNE_UPDATE_GOLDEN=1"
    want = golden[optimizer]
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=RTOL,
        atol=0,
        msg=lambda m: (
            f"{optimizer}: the loss curve moved (recorded with {golden['_recorded_with']})\n"
            f"got  {losses}\nwant {want}\n{m}"
        ),
    )
    assert losses[-1] < losses[0]  # and it learns
