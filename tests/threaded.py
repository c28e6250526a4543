"""Several ranks in one process: torch's threaded process group (the one torch's own DTensor and
FSDP tests run on), one thread per rank, real collective semantics.

Multi-process (torchrun/gloo) tests remain the proof that a feature works across processes; these
run in-process, so they are fast, need no free port, and tools that trace the test process
(coverage, mutation testing) see the collectives' code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.testing._internal.distributed import multi_threaded_pg

_LOCK = threading.Lock()  # one threaded world at a time


def run_ranks(world_size: int, fn: Callable[[int], Any], timeout: float = 120.0) -> list[Any]:
    """``fn(rank)`` on ``world_size`` threads, each inside its rank of a default process group;
    returns the results by rank. The first exception of any rank is raised here (the others are
    woken so that nobody waits for it in a collective)."""
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []
    with _LOCK:
        world = multi_threaded_pg._install_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(True)
        store = dist.HashStore()

        def body(rank: int) -> None:
            dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - handed to the caller below
                errors.append((rank, err))
                multi_threaded_pg.ProcessLocalGroup.exception_handle(err)
            finally:
                if dist.distributed_c10d._world is world:
                    dist.destroy_process_group()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world_size)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout)
            stuck = [r for r, t in enumerate(threads) if t.is_alive()]
        finally:
            torch._C._distributed_c10d._set_thread_isolation_mode(False)
            multi_threaded_pg._uninstall_threaded_pg()
            multi_threaded_pg.ProcessLocalGroup.reset()
    if errors:
        # the ranks woken by the failure end with SystemExit: report the one that failed first
        rank, err = min(errors, key=lambda e: (isinstance(e[1], SystemExit), e[0]))
        raise AssertionError(f"rank {rank} failed: {type(err).__name__}: {err}") from err
    if stuck:
        raise AssertionError(f"ranks {stuck} still running after {timeout} s")
    return results
