"""torchrun worker: fp16 weights sharded with FSDP2, LOMO with dynamic loss scaling, and an inf
gradient injected on rank 1 only, in one step.

The overflow shows on one rank's local gradients; after the reduce-scatter every shard holds it, and
the measuring pass's all-reduced norm is non-finite on both ranks. Both must skip that step (no
shard changes anywhere), halve the loss scale in step, and go on training. Rank 0 writes what
each rank saw per step.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

# this directory is on sys.path (torchrun runs the script from it)
from user_loop_common import micro_batch, tiny_model

from leantune.distributed.runtime import exit_worker
from leantune.optim import LOMO

STEPS, FAULT_STEP, FAULT_RANK = 5, 2, 1

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
model = tiny_model().to(torch.float16)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
opt = LOMO(model, lr=0.05, loss_scale="dynamic")
inject = {"on": False}


def poison(module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    if inject["on"] and hidden.requires_grad:
        hidden.register_hook(lambda g: g * float("inf"))


model.model.layers[0].register_forward_hook(poison)
steps = []
for step in range(STEPS):
    inject["on"] = step == FAULT_STEP and rank == FAULT_RANK
    before = [p.to_local().detach().clone() for p in model.parameters()]
    ids, labels = micro_batch(step, rank)
    loss = model(input_ids=ids, labels=labels).loss
    result = opt.backward(loss)
    after = [p.to_local().detach() for p in model.parameters()]
    steps.append(
        {
            "loss_finite": bool(torch.isfinite(loss).item()),
            "updated": result.updated,
            "skipped": result.skipped,
            "loss_scale": result.loss_scale,
            "changed": sum(not torch.equal(a, b) for a, b in zip(before, after)),
            "finite": all(bool(torch.isfinite(a).all()) for a in after),
        }
    )
every = [None] * dist.get_world_size()
dist.all_gather_object(every, steps)
if rank == 0:
    with open(out, "w") as fh:
        json.dump({"fault_step": FAULT_STEP, "fault_rank": FAULT_RANK, "ranks": every}, fh)
dist.barrier()
dist.destroy_process_group()
exit_worker(0)  # skips interpreter teardown, where gloo can abort a finished worker
