"""Scale-out on torch.distributed: process groups, DDP/FSDP2 strategies, launching torchrun."""
