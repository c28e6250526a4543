"""torchrun worker (2 ranks): a user's loop with leantune's pipeline stages and fused optimizers.

Runs every case of ``pipeline_common.CASES`` (optimizer x schedule x micro-batches) for ``STEPS``
steps and writes each rank's final stage weights and per-step results; then the expected refusals.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# this directory is on sys.path (torchrun runs the script from it)
from pipeline_common import CASES, OPTIMIZERS, STEPS, batch, case_name, tiny_model
from safetensors.torch import save_file

from leantune.distributed.pipeline import build_pipeline, pipeline_step
from leantune.distributed.runtime import exit_worker

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
report: dict = {"cases": {}, "errors": {}}

for case in CASES:
    name, (optim, schedule, n_micro) = case_name(case), case
    pipe = build_pipeline(tiny_model(), n_microbatches=n_micro, schedule=schedule)
    opt = OPTIMIZERS[optim](pipe.module, collectives=pipe.collectives())
    steps = []
    for step in range(STEPS):
        ids, labels = batch(step)
        res = pipeline_step(pipe, opt, ids, labels)
        b = res.backward
        steps.append(
            {"loss": res.loss, "grad_norm": b.grad_norm, "loss_scale": b.loss_scale, "updated": b.updated}
        )
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, steps)
    report["cases"][name] = gathered  # per rank, per step
    save_file({k: v.detach().clone().contiguous() for k, v in pipe.module.state_dict().items()},
              str(out / f"{name}.rank{rank}.safetensors"))  # fmt: skip


def overflow_on_stage_0() -> list[dict]:
    """Dynamic loss scaling, an inf gradient on stage 0 only at step 1: every stage must skip."""
    pipe = build_pipeline(tiny_model(), n_microbatches=2, schedule="1f1b")
    opt = OPTIMIZERS["lomo-dynamic-scale"](pipe.module, collectives=pipe.collectives())
    inject = {"on": False}
    if rank == 0:
        first = next(pipe.module.parameters())
        first.register_hook(lambda g: g * float("inf") if inject["on"] else g)
    steps = []
    for step in range(STEPS):
        inject["on"] = step == 1
        before = [p.detach().clone() for p in pipe.module.parameters()]
        b = pipeline_step(pipe, opt, *batch(step)).backward
        changed = sum(int((p != q).any()) for p, q in zip(pipe.module.parameters(), before))
        steps.append(
            {"skipped": b.skipped, "updated": b.updated, "loss_scale": b.loss_scale, "changed": changed}
        )
    return steps


report["overflow"] = [None] * dist.get_world_size()
dist.all_gather_object(report["overflow"], overflow_on_stage_0())


def refusal(key, fn):
    try:
        fn()
        report["errors"][key] = None
    except (ValueError, RuntimeError) as err:
        report["errors"][key] = str(err)


refusal("tied", lambda: build_pipeline(tiny_model(tied=True), n_microbatches=2))
refusal("too-many-stages", lambda: build_pipeline(tiny_model(layers=1), n_microbatches=2))
refusal("1f1b-few-microbatches", lambda: build_pipeline(tiny_model(), n_microbatches=1, schedule="1f1b"))


def local_collectives():
    pipe = build_pipeline(tiny_model(), n_microbatches=2, schedule="gpipe")
    opt = OPTIMIZERS["lomo-clip"](pipe.module, collectives="local")
    pipeline_step(pipe, opt, *batch(0))


refusal("local-collectives", local_collectives)
if rank == 0:
    (out / "report.json").write_text(json.dumps(report))
dist.barrier()
dist.destroy_process_group()
exit_worker(0)
