"""Peak memory of two AdaLomo steps, one process or one FSDP2 rank (run under torchrun for 2).

The model's decoder layers dominate its size, as in real LLMs (12 layers of hidden 1024, an
8000-token vocabulary: 167 M parameters, 670 MB in fp32). The peak is measured over the training
steps only (construction builds the full model on every rank before sharding it). Writes this
rank's local parameter bytes and peak RSS.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from leantune.distributed.collectives import ShardedCollectives
from leantune.distributed.runtime import exit_worker
from leantune.distributed.strategy import apply_fsdp
from leantune.optim import AdaLomo
from leantune.rss import proc_status_bytes, release_free_memory, reset_peak_rss

torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
cfg = LlamaConfig(
    vocab_size=8000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=16,
)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
if world > 1:
    apply_fsdp(model)
opt = AdaLomo(model, lr=1e-3)
if world > 1:
    opt.collectives = ShardedCollectives()
local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
release_free_memory()
if not reset_peak_rss():  # measure the training steps, not construction
    raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
for step in range(2):
    ids = torch.randint(0, 8000, (1, 64), generator=torch.Generator().manual_seed(step))
    opt.backward(model(input_ids=ids, labels=ids).loss)
peak = proc_status_bytes("VmHWM")
if world == 1 or dist.get_rank() == 0:
    with open(sys.argv[1], "w") as fh:
        json.dump({"world_size": world, "local_param_bytes": local, "peak_rss_bytes": peak}, fh)
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
    exit_worker(0)  # skips interpreter teardown, where gloo can abort a finished worker
