"""torchrun worker: a user's own FSDP2 loop (torchtitan style) with a plain leantune optimizer.

``fully_shard`` is called by this script, not by leantune; the optimizer is built on the sharded
model with no distributed argument and must find the shards itself. Each rank trains on its own
half of every global batch; rank 0 writes the gathered weights.

Modes: ``adalomo``, ``lomo-clip``, ``adamw-in-backward`` (train); ``ddp`` and ``plain`` (expected
refusals: the message is written instead); ``lomo-replicated``: ``LOMO(model,
collectives="replicated")`` on plain replicas next to torch's own ``DistributedDataParallel`` +
``SGD`` on the same micro-batches (both written: the test compares them).
"""

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

# this directory is on sys.path (torchrun runs the script from it)
from user_loop_common import STEPS, micro_batch, tiny_model
from user_loop_worker_ref import LOMO_LR, OPTIMIZERS

from leantune.distributed.runtime import exit_worker
from leantune.optim import LOMO, AdaLomo

mode, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
model = tiny_model()
result = {}
if mode == "ddp":
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    try:
        AdaLomo(ddp, lr=0.05)
        result["error"] = None
    except ValueError as err:
        result["error"] = str(err)
elif mode == "plain":
    opt = AdaLomo(model, lr=0.05)  # replicated parameters, nothing chosen
    try:
        ids, labels = micro_batch(0, rank)
        opt.backward(model(input_ids=ids, labels=labels).loss)
        result["error"] = None
    except RuntimeError as err:
        result["error"] = str(err)
elif mode == "lomo-replicated":
    reference = tiny_model()
    ddp = torch.nn.parallel.DistributedDataParallel(reference)
    sgd = torch.optim.SGD(reference.parameters(), lr=LOMO_LR)
    opt = LOMO(model, lr=LOMO_LR, collectives="replicated")
    for step in range(STEPS):
        ids, labels = micro_batch(step, rank)
        opt.backward(model(input_ids=ids, labels=labels).loss)
        sgd.zero_grad()
        ddp(input_ids=ids, labels=labels).loss.backward()
        sgd.step()
    if rank == 0:
        save_file({n: p.detach().clone() for n, p in model.named_parameters()}, out + ".safetensors")
        save_file({n: p.detach().clone() for n, p in reference.named_parameters()}, out + ".ref.safetensors")
else:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = OPTIMIZERS[mode](model)
    result["collectives"] = type(opt.collectives).__name__
    for step in range(STEPS):
        ids, labels = micro_batch(step, rank)
        opt.backward(model(input_ids=ids, labels=labels).loss)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        save_file(full, out + ".safetensors")
if rank == 0:
    with open(out, "w") as fh:
        json.dump(result, fh)
dist.barrier()
dist.destroy_process_group()
exit_worker(0)  # skips interpreter teardown, where gloo can abort a finished worker
