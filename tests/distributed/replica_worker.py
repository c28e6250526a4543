"""torchrun worker: two data-parallel replicas with AdaLomo, different data per rank.

Modes: ``collectives``, ``collectives-bf16`` (bf16 weights, stochastic rounding), ``none``.

With ``collectives`` the fused hooks average gradients (leantune's ddp strategy); with ``none`` they
do not (what earlier LOMO/AdaLomo integrations did). Rank 0 writes the max weight difference
between the replicas after each step.
"""

import json
import sys

import torch
import torch.distributed as dist

from leantune.distributed.collectives import ReplicatedCollectives
from leantune.distributed.runtime import exit_worker
from leantune.models import build_model
from leantune.optim import AdaLomo

STEPS = 4

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
model = build_model(preset="test", vocab_size=64, seed=0)  # identical initialisation on both ranks
low = sys.argv[1] == "collectives-bf16"
if low:
    model = model.to(torch.bfloat16)
start = [p.detach().clone() for p in model.parameters()]
# "none" asks explicitly for what earlier integrations did implicitly: each rank on its own
opt = AdaLomo(
    model,
    lr=1e-2,
    collectives=ReplicatedCollectives() if sys.argv[1].startswith("collectives") else "local",
    rounding="stochastic" if low else "nearest",
    seed=1234,
)
diffs = []
for step in range(STEPS):
    g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own micro-batch
    ids = torch.randint(0, 64, (4, 16), generator=g)
    opt.backward(model(input_ids=ids, labels=ids).loss)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    diffs.append((both[0] - both[1]).abs().max().item())
if rank == 0:
    with open(sys.argv[2], "w") as fh:
        changed = sum((a != p).sum().item() for a, p in zip(start, model.parameters()))
        total = sum(p.numel() for p in model.parameters())
        json.dump({"steps": STEPS, "max_diff_per_step": diffs, "changed_elements": changed / total}, fh)
dist.barrier()
dist.destroy_process_group()
exit_worker(0)  # skips interpreter teardown, where gloo can abort a finished worker
