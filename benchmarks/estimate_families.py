"""Validate ``leantune estimate`` on model families other than LLaMA, against measured peak memory.

The same protocol as ``benchmarks/estimate_validation.py`` (its worker: a fresh process per
configuration, glibc's mmap threshold fixed, the peak RSS high-water mark reset after the model and
optimizer are built, two training steps), on one model of each family's own layout, built from a
config like a ``config.json`` (random init, ~40-150 M parameters: weights, activations and the loss
each a visible part of the peak). The estimate reads the same config, as ``leantune estimate
--model DIR`` does: parameters and activations come from the family's own modelling code.

Run (from the repository root, venv active)::

    python benchmarks/estimate_families.py                   # all (~15 min, 2 threads)
    python benchmarks/estimate_families.py --only gpt2-bf16-adalomo
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import estimate_validation as ev

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "estimate_families"
_SHAPE = {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "vocab_size": 8192}
_SHAPE |= {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # some defaults lie outside 8192
_GQA = {"num_key_value_heads": 4, "intermediate_size": 2048, "max_position_embeddings": 2048}
# One config per family layout: bias (qwen2), fused qkv and gate_up (phi3), Conv1D with dropout and
# GELU (gpt2), eager attention and four norms (gemma2), parallel attention/MLP and grouped fused
# qkv (falcon), two-matrix MLP with learned positions (opt), experts (mixtral), latent attention
# with a dense and a MoE layer (deepseek_v3).
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2": {"model_type": "qwen2", **_SHAPE, **_GQA},
    "phi3": {"model_type": "phi3", **_SHAPE, **_GQA},
    "gpt2": {"model_type": "gpt2", **_SHAPE, "n_positions": 2048},
    "gemma2": {"model_type": "gemma2", **_SHAPE, **_GQA, "head_dim": 64},
    "falcon": {"model_type": "falcon", **_SHAPE, "num_kv_heads": 4, "new_decoder_architecture": True},
    "opt": {
        "model_type": "opt",
        **_SHAPE,
        "ffn_dim": 2048,
        "word_embed_proj_dim": 768,
        "max_position_embeddings": 2048,
    },
    "mixtral": {
        "model_type": "mixtral",
        **_SHAPE,
        **_GQA,
        "intermediate_size": 1024,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        **_SHAPE,
        "num_key_value_heads": 12,
        "intermediate_size": 2048,
        "moe_intermediate_size": 512,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 128,
        "q_lora_rank": 256,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 32,
        "v_head_dim": 64,
        "n_group": 1,
        "topk_group": 1,
        "max_position_embeddings": 2048,
    },
}
# (family, optimizer, dtype, checkpointing, seq, batch)
CONFIGS = [
    *((f, "adalomo", "fp32", False, 512, 2) for f in FAMILIES),
    ("qwen2", "adalomo", "bf16", False, 512, 2),
    ("mixtral", "adalomo", "bf16", False, 512, 2),
    ("gpt2", "adamw", "fp32", False, 512, 1),
    ("phi3", "lomo", "fp32", True, 1024, 1),
    ("gemma2", "adalomo", "fp32", False, 1024, 1),
    ("deepseek_v3", "adamw", "bf16", False, 256, 2),
]


def _name(family: str, optim: str, dtype: str, ckpt: bool, seq: int, batch: int) -> str:
    return "-".join([family, dtype, optim, *(["ckpt"] if ckpt else []), f"s{seq}b{batch}"])


def measure(
    family: str, optim: str, dtype: str, ckpt: bool, seq: int, batch: int, *, threads: int, steps: int
) -> dict:
    payload = {
        "preset": None,
        "optim": optim,
        "dtype": dtype,
        "seq": seq,
        "batch": batch,
        "ckpt": ckpt,
        "accum": 1,
        "threads": threads,
        "steps": steps,
        "hf_config": FAMILIES[family],
    }
    return ev.measure_in_subprocess(payload, family, threads=threads)


def predict(family: str, optim: str, dtype: str, ckpt: bool, seq: int, batch: int) -> dict:
    from leantune.estimate import ModelShape, TrainSetup, estimate_memory

    shape = ModelShape.from_hf_config(FAMILIES[family], name=family)
    setup = TrainSetup(optimizer=optim, seq_len=seq, batch_size=batch, dtype=dtype, grad_checkpointing=ckpt)
    return estimate_memory(shape, setup).to_dict()


def format_markdown(report: dict[str, Any]) -> str:
    rows, s = report["rows"], report["summary"]
    commit, dirty = ev.commit_of(report)
    return "\n".join(
        [
            "# `leantune estimate` on other model families, against measured peak memory",
            "",
            f"Command: `{report['command']}`  ",
            f"Date: {report['date']}; {report['machine']}; torch threads: {report['threads']}; steps per "
            f"config: {report['steps']}; glibc `MALLOC_MMAP_THRESHOLD_={ev.FIXED_MMAP_THRESHOLD}`; commit "
            f"{commit}" + (" (uncommitted changes in src/)" if dirty else "") + ".",
            "",
            "Protocol and error as in [estimate_validation.md](estimate_validation.md); the models are",
            "random inits of the configs in `benchmarks/estimate_families.py` (6 layers, hidden 768,",
            "vocabulary 8192).",
            "",
            *ev.format_table(rows),
            "",
            f"**Max |error| {s['max_abs_error'] * 100:.1f}%, mean |error| {s['mean_abs_error'] * 100:.1f}%; "
            f"{s['within_target']}/{s['count']} configurations within {s['target'] * 100:.0f}%.**",
            "",
            "Predicted breakdown at the peak moment (MiB):",
            "",
            *ev._breakdown_table(rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated configuration names (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--from-json", type=Path, help="rewrite <out>.md from a saved <out>.json, no runs")
    args = parser.parse_args(argv)
    if args.from_json:
        args.out.with_suffix(".md").write_text(format_markdown(json.loads(args.from_json.read_text())) + "\n")
        return 0
    by_name = {_name(*c): c for c in CONFIGS}
    names = [n.strip() for n in args.only.split(",")] if args.only else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(f"unknown configuration(s) {unknown}; known: {', '.join(by_name)}", file=sys.stderr)
        return 2
    rows = []
    print(ev.format_table([])[0], flush=True)
    for name in names:
        t0 = time.time()
        c = by_name[name]
        rows.append(ev._row(name, predict(*c), measure(*c, threads=args.threads, steps=args.steps)))
        print(ev.format_table([rows[-1]])[2], f"({time.time() - t0:.0f} s)", flush=True)
    report = {
        "command": "python benchmarks/estimate_families.py" + (" " + " ".join(argv) if argv else ""),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "threads": args.threads,
        "steps": args.steps,
        "rows": rows,
        "summary": ev._summary(rows),
        "source": benchlib.source(),
    }
    benchlib.write_report(args.out, report, format_markdown(report) + "\n")
    s = report["summary"]
    print(
        f"max |error| {s['max_abs_error'] * 100:.1f}%, mean {s['mean_abs_error'] * 100:.1f}%; "
        f"wrote {args.out}.md/.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
