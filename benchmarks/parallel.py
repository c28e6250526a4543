"""Tensor, pipeline and fully sharded data parallelism on 2 CPU ranks (gloo) against one rank:
per-rank peak memory, step time and the communication volume of a step, counted exactly.

    python benchmarks/parallel.py [--preset 0.1b] [--seq 256] [--batch 4] [--steps 3] [--warmup 1]

Layouts (each in fresh processes: ``torchrun --standalone --nproc-per-node 2`` for two ranks):

* ``one``: one rank, the whole model and the whole global batch (the reference);
* ``tp2``: tensor parallelism over 2 ranks (:func:`leantune.distributed.strategy.wrap_model` with a
  ``(dp=1, tp=2)`` mesh, as ``leantune train dist.tp=2`` does): both ranks take the whole batch;
* ``pp2``: two pipeline stages (:func:`leantune.distributed.pipeline.build_pipeline`, 1F1B,
  ``--microbatches`` micro-batches of the whole batch);
* ``fsdp2``: FSDP2 over 2 ranks (``wrap_model(..., "fsdp")``, as ``dist.strategy=fsdp``): each
  rank takes its half of the batch.

Every layout trains the same model (``--preset``, random init, seed 0, fp32) with AdaLomo (lr 1e-3)
on the same global batches: ``--warmup`` untimed steps, then ``--steps`` timed ones. Per rank: the
peak RSS over the steps (construction excluded, as in ``distributed.py``), the median step time, and
every collective and point-to-point call of the timed steps with its tensor bytes. The losses of
every step must equal the one-rank run's (rtol 1e-4): a benchmark whose layouts computed something
else would compare nothing.

Communication is counted below ``torch.distributed``: a ``TorchDispatchMode`` sees each ``c10d``
op (what ``dist.all_reduce``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``broadcast``,
``send``/``recv``, ``batch_isend_irecv`` become: FSDP2, pipelining, leantune's optimizer
collectives) and each functional collective (``_c10d_functional``: what DTensor's redistributions,
i.e. tensor parallelism, call), with the layer named by the op's namespace. One place, so a
``batch_isend_irecv`` is not counted again as its ``isend``s, and DTensor's collectives, which
never go through ``torch.distributed``'s Python functions, are seen. Bytes of a call: its largest
tensor argument or result, i.e. the whole (unsharded) tensor of an all-gather or reduce-scatter,
the tensor of an all-reduce, broadcast, send or receive.

Results: ``benchmarks/results/parallel.{md,json}``. Step times on a shared 2-core machine are noisy
and two ranks share its two cores; the byte counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import benchlib
from leantune.rss import proc_status_bytes, release_free_memory, reset_peak_rss

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {
    # name: (label, ranks)
    "one": ("one rank", 1),
    "tp2": ("tensor parallel", 2),
    "pp2": ("pipeline (1F1B)", 2),
    "fsdp2": ("FSDP2", 2),
}
LR = 1e-3
RTOL = 1e-4
# glibc keeps freed large blocks in its heap after adapting its mmap threshold; fixing the
# threshold makes RSS follow the live tensors (the same setting as benchmarks/distributed.py).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
_COMM_NAMESPACES = {
    "c10d": "c10d",
    "_c10d_functional": "functional",
    "_c10d_functional_autograd": "functional",
}
# ops of those namespaces that move no data: waiting for a result, the functional collectives'
# autograd wrapper (it wraps the result of the collective counted just before), barriers
_NOT_COMM = {"wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier_"}
# c10d op -> the torch.distributed call it comes from
_KIND = {
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "_allgather_base_": "all_gather_into_tensor",
    "allgather_into_tensor_coalesced_": "all_gather_into_tensor",
    "allgather_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter_tensor",
    "reduce_scatter_": "reduce_scatter",
    "broadcast_": "broadcast",
    "recv_": "recv",
    "recv_any_source_": "recv",
}


# --- counting --------------------------------------------------------------------------------


def _tensor_bytes(x: Any) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(y) for y in x)
    return 0


def comm_kind(namespace: str, name: str) -> str | None:
    """The label of a dispatcher op in the report (``all_reduce``, ``send``, ``all_reduce
    (functional)``...), or None for an op that moves no data (or is no communication)."""
    layer = _COMM_NAMESPACES.get(namespace)
    if layer is None or name in _NOT_COMM:
        return None
    kind = _KIND.get(name, name) if layer == "c10d" else name
    return kind if layer == "c10d" else f"{kind} (functional)"


def comm_counter():
    """A ``TorchDispatchMode`` that counts every communication op dispatched while it is active:
    ``.calls[kind]`` and ``.bytes[kind]`` (see :func:`comm_kind`). ``with counter: ...``."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class CommCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: dict[str, int] = defaultdict(int)
            self.bytes: dict[str, int] = defaultdict(int)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if isinstance(func, torch._ops.HigherOrderOperator):
                return func(*args, **kwargs)
            # Modes run before tensor subclasses: let DTensor turn its op into local ops and
            # functional collectives first, which then come back here (as in torch's CommDebugMode).
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented
            out = func(*args, **kwargs)
            kind = comm_kind(func.namespace, func._overloadpacket.__name__)
            if kind is not None:
                size = max([_tensor_bytes(a) for a in (*args, *kwargs.values())] + [_tensor_bytes(out)])
                self.calls[kind] += 1
                self.bytes[kind] += size
            return out

        def snapshot(self) -> dict[str, dict[str, int]]:
            return {k: {"calls": self.calls[k], "bytes": self.bytes[k]} for k in sorted(self.calls)}

        def reset(self) -> None:
            self.calls.clear()
            self.bytes.clear()

    return CommCounter()


def closed_form(preset: str, seq: int, batch: int, microbatches: int) -> dict[str, Any]:
    """Bytes per step and rank that the layouts' activation traffic should come to (fp32).

    ``tp2``: each decoder layer all-reduces its attention and MLP outputs in forward (the row-wise
    ``o_proj`` and ``down_proj``: 2 x (batch, seq, hidden)), and in backward the gradient of the
    hidden states entering the attention and the MLP block: their column-wise modules (``q``, ``k``,
    ``v``; ``gate``, ``up``) share one replicated DTensor input, so their partial gradients are
    summed and all-reduced once per block, as Megatron's ``f`` operator does (2 x (batch, seq,
    hidden)). ``pp2``: each micro-batch's
    hidden states go forward and their gradient back over the stage boundary. ``fsdp2``: the
    weights are all-gathered in forward and again in backward, the gradients reduce-scattered
    (whole-tensor bytes, see the module docstring).
    """
    from leantune.models import PRESETS

    p = PRESETS[preset]
    layers, hidden, inter = p.num_hidden_layers, p.hidden_size, p.intermediate_size
    kv = hidden // p.num_attention_heads * p.num_key_value_heads
    layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * inter + 2 * hidden  # q o k v, MLP, 2 norms
    embed = p.vocab_size * hidden * (1 if p.tie_word_embeddings else 2)
    weights = 4 * (embed + layers * layer + hidden)  # + the final norm
    act = batch * seq * hidden * 4
    return {
        "activation_bytes": act,
        "weight_bytes": weights,
        "tp2_forward_all_reduce": {"calls": 2 * layers, "bytes": 2 * layers * act},
        "tp2_backward_all_reduce": {"calls": 2 * layers, "bytes": 2 * layers * act},
        "pp2_send_plus_recv": {"calls": 2 * microbatches, "bytes": 2 * act},
        # units: each layer, the embedding, the head, the root (the final norm); the root is not
        # resharded after forward, so not gathered again in backward
        "fsdp2_all_gather": {"calls": 2 * (layers + 3) - 1, "bytes": 2 * weights - 4 * hidden},
        "fsdp2_reduce_scatter": {"calls": layers + 3, "bytes": weights},
    }


# --- the worker (one process per rank) --------------------------------------------------------


def _global_batch(step: int, batch: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (batch, seq), generator=g)


class _DistCfg:
    mixed_precision = None
    cpu_offload = False
    tp = 1


def worker(params: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from leantune.models import build_model
    from leantune.optim import AdaLomo

    torch.set_num_threads(1)
    layout = params["layout"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != LAYOUTS[layout][1]:
        raise SystemExit(f"layout {layout} needs {LAYOUTS[layout][1]} ranks, got {world}")
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    batch, seq, n_micro = params["batch"], params["seq"], params["microbatches"]
    model = build_model(preset=params["preset"], seed=0)
    model.config.use_cache = False
    vocab = model.config.vocab_size
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cpu = torch.device("cpu")

    if layout == "pp2":
        from leantune.distributed.pipeline import build_pipeline, pipeline_step

        pipe = build_pipeline(model, n_microbatches=n_micro, schedule="1f1b")
        del model  # the other stage's layers go with it
        opt = AdaLomo(pipe.module, lr=LR, collectives=pipe.collectives())
        local_model = pipe.module

        def step_fn(ids):
            return pipeline_step(pipe, opt, ids, ids).loss
    else:
        from leantune.distributed.strategy import attach_optimizer, wrap_model

        cfg, mesh, strategy = _DistCfg(), None, {"one": "none", "tp2": "none", "fsdp2": "fsdp"}[layout]
        if layout == "tp2":
            from torch.distributed.device_mesh import init_device_mesh

            cfg.tp = 2
            mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
        train_model = wrap_model(model, strategy, fused=True, device=cpu, dist_cfg=cfg, mesh=mesh)
        opt = AdaLomo(model, lr=LR)
        attach_optimizer(opt, strategy, mesh)
        local_model = model
        # fsdp2: each rank its half of the global batch (equal token counts, so the mean of the
        # ranks' mean losses is the global mean and the averaged gradients are the global ones)
        rows = slice(rank * batch // 2, (rank + 1) * batch // 2) if layout == "fsdp2" else slice(None)

        def step_fn(ids):
            ids = ids[rows]
            loss = train_model(input_ids=ids, labels=ids).loss
            opt.backward(loss)
            return loss.item()

    local_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in local_model.parameters()
    )
    counter = comm_counter()
    release_free_memory()
    if not reset_peak_rss():  # peak over the training steps only
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    rss_start = proc_status_bytes("VmRSS")
    count = params.get("count", True)
    losses, times, comm = [], [], []
    for step in range(params["warmup"] + params["steps"]):
        ids = _global_batch(step, batch, seq, vocab)
        timed = step >= params["warmup"]
        counter.reset()
        t0 = time.perf_counter()
        if timed and count:  # the warm-up also runs the pipeline's shape inference: not a step's traffic
            with counter:
                loss = step_fn(ids)
        else:
            loss = step_fn(ids)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if timed:
            times.append(dt)
            comm.append(counter.snapshot())
    record = {
        "rank": rank,
        "param_bytes": param_bytes,
        "local_param_bytes": local_bytes,
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
        "start_rss_bytes": rss_start,
        "step_seconds": times,
        "losses": losses,
        "comm_per_step": comm,
    }
    records = [record]
    if world > 1:
        records = [None] * world
        dist.all_gather_object(records, record)
    if rank == 0:
        benchlib.emit_result({"layout": layout, "ranks": records})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        from leantune.distributed.runtime import exit_worker

        exit_worker(0)  # skips interpreter teardown, where gloo can abort a finished worker


# --- the parent: run, summarise, render --------------------------------------------------------


def run_layout(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one layout in fresh processes; its ranks' records, or ``{"error": ...}``."""
    params = {
        "layout": name,
        "preset": args.preset,
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "microbatches": args.microbatches,
    }
    script = str(Path(__file__).resolve())
    ranks = LAYOUTS[name][1]
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = [*launch, script, "--worker", json.dumps(params)]
    env = {**os.environ, **benchlib.thread_env(1), **MALLOC_ENV}
    try:
        return benchlib.run_worker(cmd, env, name, args.timeout, oom_score_adj=1000)
    except benchlib.WorkerError as err:
        return {"layout": name, "error": err.last_line, "detail": err.detail}


def summarise(name: str, raw: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the report from a layout's raw records (and the one-rank row, for the losses)."""
    label, n = LAYOUTS[name]
    row: dict[str, Any] = {"layout": name, "label": label, "ranks": n}
    if "error" in raw:
        return {**row, "error": raw["error"], "detail": raw.get("detail", "")}
    recs = raw["ranks"]
    # the layout's loss per step: tp2 and pp2 ranks hold the whole batch's, fsdp2 ranks their half's
    per_step = [statistics.fmean(r["losses"][i] for r in recs) for i in range(len(recs[0]["losses"]))]
    per_rank = []
    for r in recs:
        steps = r["comm_per_step"]
        kinds = sorted({k for s in steps for k in s})
        totals = [sum(s[k]["bytes"] for k in s) for s in steps]
        per_rank.append(
            {
                "rank": r["rank"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "local_param_bytes": r["local_param_bytes"],
                "start_rss_bytes": r["start_rss_bytes"],
                "step_seconds": r["step_seconds"],
                "median_step_seconds": statistics.median(r["step_seconds"]),
                # per step: the timed steps' mean (they are checked equal: `comm_steps_equal`)
                "comm_per_step": {
                    k: {
                        "calls": statistics.fmean(s.get(k, {}).get("calls", 0) for s in steps),
                        "bytes": statistics.fmean(s.get(k, {}).get("bytes", 0) for s in steps),
                    }
                    for k in kinds
                },
                "comm_bytes_per_step": statistics.fmean(totals) if totals else 0.0,
                "comm_steps_equal": all(s == steps[0] for s in steps),
            }
        )
    row.update(
        param_bytes=recs[0]["param_bytes"],
        per_rank=per_rank,
        peak_rss_bytes=max(r["peak_rss_bytes"] for r in per_rank),
        step_seconds=max(r["median_step_seconds"] for r in per_rank),
        losses=per_step,
        final_loss=per_step[-1],
    )
    if ref is not None and "losses" in ref:
        diff = [abs(a - b) / abs(b) for a, b in zip(per_step, ref["losses"], strict=True)]
        row["loss_max_rel_diff"] = max(diff)
        row["loss_equal"] = max(diff) <= RTOL
    return row


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x >= 1e5 else f"{x / 1e3:,.1f} kB" if x >= 100 else f"{x:.0f} B"


def _comm_cell(rank: dict[str, Any]) -> str:
    if not rank["comm_per_step"]:
        return "none"
    parts = [
        f"{k} {v['calls']:g}x {_mb(v['bytes'])}"
        for k, v in sorted(rank["comm_per_step"].items(), key=lambda kv: -kv[1]["bytes"])
    ]
    return f"**{_mb(rank['comm_bytes_per_step'])}**: " + "; ".join(parts)


def render(report: dict[str, Any]) -> str:
    """The Markdown report from the JSON one (:func:`main` writes both)."""
    s = report["settings"]
    rows = report["rows"]
    ref = next((r for r in rows if r["layout"] == "one" and "error" not in r), None)
    headers = [
        "layout",
        "ranks",
        "weights / rank",
        "RSS before the steps / rank",
        "peak RSS / rank",
        "x one rank",
        "s / step (median)",
        "x one rank",
        "communication / step / rank (by kind: calls, bytes)",
        "final loss",
        f"= one rank (rtol {s['rtol']:g})",
    ]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["label"], str(r["ranks"]), *["–"] * 6, f"failed: {r['error']}", "–", "–"])
            continue
        start = " / ".join(benchlib.fmt(p["start_rss_bytes"] / 2**30, ".2f", " GiB") for p in r["per_rank"])
        rss = " / ".join(benchlib.fmt(p["peak_rss_bytes"] / 2**30, ".2f", " GiB") for p in r["per_rank"])
        weights = " / ".join(
            benchlib.fmt(p["local_param_bytes"] / 2**30, ".3f", " GiB") for p in r["per_rank"]
        )
        comm = "<br>".join(
            (f"rank {p['rank']}: " if len(r["per_rank"]) > 1 else "") + _comm_cell(p) for p in r["per_rank"]
        )
        if r is ref:
            equal = "reference"
        elif "loss_equal" not in r:
            equal = "–"
        else:
            equal = (
                "yes" if r["loss_equal"] else "**NO**"
            ) + f" (max rel. diff {r['loss_max_rel_diff']:.1e})"
        table.append(
            [
                r["label"],
                str(r["ranks"]),
                weights,
                start,
                rss,
                benchlib.fmt(benchlib.ratio(r["peak_rss_bytes"], ref and ref["peak_rss_bytes"]), ".2f"),
                benchlib.fmt(r["step_seconds"], ".2f"),
                benchlib.fmt(benchlib.ratio(r["step_seconds"], ref and ref["step_seconds"]), ".2f"),
                comm,
                f"{r['final_loss']:.6f}",
                equal,
            ]
        )
    cf = report.get("closed_form") or {}
    act = cf.get("activation_bytes")
    lines = [
        "# Tensor, pipeline and fully sharded parallelism against one rank (CPU, gloo)",
        "",
        f"`{report['command']}` — {report['date']}, torch {report['machine']['torch']}, "
        f"{report['machine']['cpu_model']} ({report['machine']['cpus']} cores, shared), load average "
        f"{benchlib.format_load(report.get('load_before'))} before, "
        f"{benchlib.format_load(report.get('load_after'))} after.",
        "",
        f"Preset {s['preset']} (LLaMA, fp32), global batch {s['batch']} x {s['seq']} tokens (the same "
        f"batches for every layout), AdaLomo lr {s['lr']:g}, {s['warmup']} warm-up + {s['steps']} timed "
        f"steps, 1 thread per rank. `tp2`: `dist.tp=2` (DTensor, the model's plan); `pp2`: two stages, "
        f"1F1B, {s['microbatches']} micro-batches; `fsdp2`: `dist.strategy=fsdp`, "
        f"{s['batch'] // 2} sequences per rank.",
        "",
        benchlib.render_table(headers, table, "lrrrrrrrlrl"),
        "**Noise.** The machine has 2 CPU cores shared with other jobs: two ranks time-share them, so "
        "step times and their ratios measure the layouts' overhead on a busy machine, not a speed-up, "
        "and vary from run to run. The byte counts are exact and do not depend on the machine.",
        "",
        "**Counting.** Every `c10d` op (what `torch.distributed`'s calls become: FSDP2's "
        "`all_gather_into_tensor` / `reduce_scatter_tensor`, the pipeline's `send` / `recv` and loss "
        "`broadcast`, the optimizers' `all_reduce`) and every functional collective (`(functional)`: "
        "DTensor, i.e. tensor parallelism) dispatched during the timed steps, by a `TorchDispatchMode`. "
        "Bytes per call: its largest tensor, so an all-gather or reduce-scatter counts the whole "
        "(unsharded) tensor; on the wire a ring over 2 ranks sends half of that per rank, an all-reduce "
        "the whole. RSS before the steps: after construction and sharding, the rank's weights and the "
        "process itself (python, torch, transformers, gloo: about 0.4 GiB); peak RSS: the high-water mark "
        "over the steps.",
    ]
    if act:
        lines += [
            "",
            f"**Closed forms** (one (batch, seq, hidden) fp32 activation = {_mb(act)}): "
            f"`tp2` forward {cf['tp2_forward_all_reduce']['calls']} all-reduces "
            f"({_mb(cf['tp2_forward_all_reduce']['bytes'])}: `o_proj` and `down_proj` of each layer), "
            f"backward {cf['tp2_backward_all_reduce']['calls']} "
            f"({_mb(cf['tp2_backward_all_reduce']['bytes'])}: the gradient of the hidden states "
            "entering each attention and MLP block, once per block, as Megatron's `f` operator); `pp2` "
            f"{cf['pp2_send_plus_recv']['calls']} sends + receives per rank "
            f"({_mb(cf['pp2_send_plus_recv']['bytes'])}); `fsdp2` the weights "
            f"({_mb(cf['weight_bytes'])}) all-gathered in forward and again in backward (but for the "
            f"root unit, the final norm: {cf['fsdp2_all_gather']['calls']} calls, "
            f"{_mb(cf['fsdp2_all_gather']['bytes'])}), their gradients reduce-scattered once "
            f"({cf['fsdp2_reduce_scatter']['calls']} calls, {_mb(cf['fsdp2_reduce_scatter']['bytes'])}). "
            "The rest is the optimizers' statistics (`all_reduce`: AdaLomo's column sums and RMS over "
            "the shards) and the pipeline's loss broadcast.",
        ]
    if report.get("checks"):
        lines += ["", "**Checks.**", ""] + [f"- {c}" for c in report["checks"]]
    lines += ["", benchlib.source_note(report.get("source"))]
    return "\n".join(lines) + "\n"


def expected_traffic(cf: dict[str, Any]) -> dict[str, dict[str, tuple[tuple[str, ...], dict[str, int]]]]:
    """Layout -> check label -> (the counted kinds it sums, the closed form's calls and bytes)."""
    tp = {k: cf["tp2_forward_all_reduce"][k] + cf["tp2_backward_all_reduce"][k] for k in ("calls", "bytes")}
    return {
        "tp2": {"all-reduce (DTensor, 2 + 2 per layer)": (("all_reduce (functional)",), tp)},
        "pp2": {"send + recv": (("send", "recv"), cf["pp2_send_plus_recv"])},
        "fsdp2": {
            "all-gather": (("all_gather_into_tensor",), cf["fsdp2_all_gather"]),
            "reduce-scatter": (("reduce_scatter_tensor",), cf["fsdp2_reduce_scatter"]),
        },
    }


def checks(rows: list[dict[str, Any]], cf: dict[str, Any]) -> list[str]:
    """The guards and the measured traffic against the closed forms, in words."""
    out = []
    by = {r["layout"]: r for r in rows if "error" not in r}
    if "one" in by:
        got, want = by["one"]["param_bytes"], cf["weight_bytes"]
        out.append(f"weights: {got:,} B in the model, {want:,} B by the closed form: "
                   f"{'equal' if got == want else 'NOT equal'}")  # fmt: skip
    for r in by.values():
        for p in r["per_rank"]:
            if not p["comm_steps_equal"]:
                out.append(f"{r['layout']} rank {p['rank']}: the timed steps' traffic differs between steps")
        if r.get("loss_equal") is False:
            out.append(
                f"{r['layout']}: losses differ from one rank's (max rel. diff {r['loss_max_rel_diff']:.1e})"
            )
    for name, expected in expected_traffic(cf).items():
        for p in by[name]["per_rank"] if name in by else []:
            for label, (kinds, want) in expected.items():
                got = {
                    k: sum(p["comm_per_step"].get(o, {}).get(k, 0) for o in kinds) for k in ("calls", "bytes")
                }
                out.append(
                    f"{name} rank {p['rank']}: {label} {got['calls']:g} calls, "
                    f"{got['bytes']:,.0f} B per step; closed form {want['calls']} calls, "
                    f"{want['bytes']:,} B: {'equal' if got == want else 'NOT equal'}"
                )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked: exits with a message naming the option that is out of range."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.1b", help="leantune.models preset, a LLaMA (default: 0.1b)")
    ap.add_argument("--seq", type=int, default=256, help="sequence length (default: 256)")
    ap.add_argument("--batch", type=int, default=4, help="global batch in sequences (default: 4)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    ap.add_argument("--microbatches", type=int, default=4, help="pp2's micro-batches (default: 4)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(LAYOUTS)}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per layout (default: 900)")
    ap.add_argument("--out", type=Path, default=RESULTS / "parallel", help="report path without suffix")
    ap.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    from leantune.models import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    for key in ("seq", "batch", "steps", "microbatches"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be >= 1")
    if args.seq < 2:
        raise SystemExit("--seq must be >= 2 (a causal LM's loss needs a next token)")
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1: the first pipeline step infers the stages' shapes")
    args.layouts = benchlib.parse_only(args.only, list(LAYOUTS))
    if "fsdp2" in args.layouts and args.batch % 2:
        raise SystemExit(f"--batch {args.batch}: fsdp2 splits the global batch over 2 ranks, use an even one")
    if "pp2" in args.layouts:
        if args.microbatches < 2:
            raise SystemExit("--microbatches must be >= 2: 1F1B over 2 stages needs one per stage")
        if args.batch % args.microbatches:
            raise SystemExit(f"--batch {args.batch} is not a multiple of --microbatches {args.microbatches}")
        if PRESETS[args.preset].tie_word_embeddings:
            raise SystemExit(
                f"--preset {args.preset} ties its embeddings: pp2 would put the two on different stages "
                "(leave it out with --only, or pick an untied preset)"
            )
    heads = PRESETS[args.preset].num_attention_heads
    if "tp2" in args.layouts and heads % 2:
        raise SystemExit(f"--preset {args.preset} has {heads} attention heads: tp2 needs an even number")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    command = "python benchmarks/parallel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "benchmark": "parallel",
        "command": command.strip(),
        "date": str(datetime.now(timezone.utc).date()),
        "machine": benchlib.machine(),
        "source": benchlib.source(),
        "load_before": benchlib.loadavg(),
        "settings": {
            "preset": args.preset,
            "seq": args.seq,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "microbatches": args.microbatches,
            "dtype": "fp32",
            "optimizer": "adalomo",
            "lr": LR,
            "rtol": RTOL,
            "threads_per_rank": 1,
            "malloc_env": MALLOC_ENV,
        },
        "closed_form": closed_form(args.preset, args.seq, args.batch, args.microbatches),
        "rows": [],
    }
    order = ["one"] + [n for n in args.layouts if n != "one"] if "one" in args.layouts else args.layouts
    ref = None
    for name in order:
        t0 = time.perf_counter()
        row = summarise(name, run_layout(name, args), ref)
        if name == "one" and "error" not in row:
            ref = row
        report["rows"].append(row)
        status = row.get("error") or (
            f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, {row['step_seconds']:.2f} s/step, "
            f"loss {row['final_loss']:.6f}"
        )
        print(f"{name}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
    report["load_after"] = benchlib.loadavg()
    report["checks"] = checks(report["rows"], report["closed_form"])
    text = render(report)
    benchlib.write_report(args.out, report, text)
    print(text)


if __name__ == "__main__":
    main()
