"""Process-group set-up from torchrun's environment, and small helpers used by the trainer."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "DistEnv",
    "all_agree",
    "all_reduce_sum",
    "barrier",
    "exit_worker",
    "init_distributed",
    "is_distributed",
    "run_on_main",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    tp: int = 1
    """Tensor-parallel degree: ranks ``r`` with equal ``r // tp`` hold the shards of one model."""
    pp: int = 1
    """Pipeline stages: every rank of the job is one stage of the same model (no data parallelism)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads its own part of every global batch."""
        return self.world_size // (self.tp * self.pp)

    @property
    def dp_rank(self) -> int:
        """This rank's place among them (the tensor-parallel ranks of a group, and the stages of a
        pipeline, read the same data)."""
        return self.rank // (self.tp * self.pp)

    def mesh(self) -> Any:
        """The ``(dp, pp, tp)`` device mesh of the job (row-major: rank = (dp_rank * pp + stage) *
        tp + tp_rank, so a tensor-parallel group sits on neighbouring devices)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(
            self.device.type, (self.dp_size, self.pp, self.tp), mesh_dim_names=("dp", "pp", "tp")
        )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(
    strategy: str, device: str = "auto", timeout_minutes: float = 30.0, tp: int = 1, pp: int = 1
) -> DistEnv:
    """Join the torchrun job (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) or run as one process.

    Backend by device: ``nccl`` on CUDA, ``gloo`` on CPU. With ``strategy="none"`` under torchrun
    this is an error, unless all ranks form one tensor-parallel group (``tp`` = world size): every
    rank would train its own copy.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp:
        raise ValueError(f"dist.tp={tp} must divide the number of processes ({world})")
    if world % (tp * pp):
        raise ValueError(f"dist.tp={tp} x dist.pp={pp} must divide the number of processes ({world})")
    if pp > 1 and world == 1:
        raise ValueError(f"dist.pp={pp} runs one stage per process: start {pp} processes (dist.nproc={pp})")
    if tp > 1 and world == 1:
        raise ValueError(
            f"dist.tp={tp} needs {tp} processes: set dist.nproc={tp} (or a multiple), or start "
            "leantune under torchrun"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError(f"train.device={device} but CUDA is not available; use train.device=cpu")
    if want_cuda:
        dev = torch.device(
            "cuda", local_rank if device in ("auto", "cuda") else torch.device(device).index or 0
        )
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    # One process without torchrun needs no group, except for FSDP2, whose fully_shard needs a
    # device mesh (e.g. for its CPU offload on one GPU).
    if world == 1 and not is_distributed() and strategy != "fsdp":
        return DistEnv(0, 1, 0, dev, None)
    if strategy == "none" and world != tp * pp:
        raise ValueError(
            f"launched with {world} processes but dist.strategy=none"
            + (f" (dist.tp={tp})" if tp > 1 else "")
            + ": set dist.strategy=ddp or fsdp"
        )
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not is_distributed():
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun's rendezvous
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # fsdp in one process started without torchrun: a one-rank group on an in-process
            # store, which needs no address or port.
            store = dist.HashStore()
            dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, tp, pp)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_agree(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank: every rank reaches the same decision (e.g. to stop)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give its result (or raise its exception) on every rank."""
    if not is_distributed():
        return fn()
    box: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # re-raised on every rank
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def exit_worker(code: int = 0) -> NoReturn:
    """Leave a torchrun worker process without interpreter teardown.

    FSDP's device mesh and DTensors still reference the process group after
    ``destroy_process_group()``; if the group is finalised during interpreter shutdown, gloo's
    worker threads can abort the process (SIGABRT, "terminate called without an active
    exception") after a run that finished and wrote everything. Flushing and ``os._exit`` skips that
    teardown. Call it only once all output (files, logs) is written and closed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
