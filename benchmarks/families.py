"""Every supported model family through the CLI, as a new user would bring it.

For each family a tiny random model (2 layers, hidden 64; ``tests/families.py``) is saved as a
local model directory with a BPE tokenizer and a Llama-3-style chat template, and these commands
run, each in a fresh process:

* **full**: ``leantune train model.path=DIR data.train=chat.jsonl`` (20 steps, AdaLomo);
* **HF reload**: the exported ``final/`` loaded by plain ``transformers`` (its weights equal the
  run's, and its loss on a batch equals the trained model's);
* **HFT**: the same with ``train.hft=true`` (the trainable fraction, counted in parameters);
* **LoRA**: ``peft.method=lora peft.target_modules=[all-linear]`` (experts too on MoE models);
* **ddp** / **fsdp**: ``dist.strategy=ddp|fsdp dist.nproc=2``;
* **estimate**: ``leantune estimate --model DIR2 --json`` on a larger model of the same family
  (~10-60 M parameters, so that weights and activations are a visible part of the peak) against
  that model's measured peak RSS over two training steps (the protocol of
  ``benchmarks/estimate_validation.py``).

Run (from the repository root, venv active)::

    python benchmarks/families.py                        # all 20 families (~40 min on 2 cores)
    python benchmarks/families.py --only phi3,mixtral --skip fsdp
    python benchmarks/families.py --skip full,reload,hft,lora,fsdp,estimate --merge  # ddp only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import estimate_validation as ev

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/families.py: the tiny models of the test suite
from tests.families import FAMILIES, save_family, write_chat_data  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "families"
COLUMNS = ("full", "reload", "hft", "lora", "ddp", "fsdp", "estimate")
# The larger model of the estimate column: what tests/families.py builds, wider and deeper.
LARGER = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
LARGER_BY_FAMILY = {
    "gpt2": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "n_inner": 1536},
    "opt": {
        "hidden_size": 512,
        "ffn_dim": 1536,
        "word_embed_proj_dim": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
    },
    "falcon": {
        "hidden_size": 512,
        "ffn_hidden_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_kv_heads": 4,
    },
    "gpt_neox": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
    },
    "deepseek_v3": {
        **LARGER,
        "num_key_value_heads": 8,
        "moe_intermediate_size": 256,
        "kv_lora_rank": 64,
        "q_lora_rank": 128,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 32,
        "v_head_dim": 64,
    },
    "qwen2_moe": {**LARGER, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 512},
    "qwen3_moe": {**LARGER, "moe_intermediate_size": 256, "head_dim": 64},
    "qwen3": {**LARGER, "head_dim": 64},
    "gemma": {**LARGER, "head_dim": 64},
    "gemma2": {**LARGER, "head_dim": 64},
    "gemma3_text": {**LARGER, "head_dim": 64},
}
ESTIMATE_SEQ, ESTIMATE_BATCH = 256, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(args: list[str], *, timeout: float = 900) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "leantune", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def _train_args(model: Path, data: Path, out: Path, name: str) -> list[str]:
    return [
        "train",
        f"model.path={model}",
        f"data.train={data}",
        "data.max_length=64",
        "data.num_eval=8",
        "train.batch_size=8",
        "train.max_steps=20",
        "optim.lr=0.01",
        "optim.warmup_steps=2",
        "eval.every=0",
        "eval.accuracy_samples=0",
        "log.every=1",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        f"train.output_dir={out}",
        f"train.run_name={name}",
    ]


def _losses(run: Path) -> list[float]:
    from leantune.monitor import read_metrics

    return [r["loss"] for r in read_metrics(run) if r.get("kind") == "train"]


def _fail(log: str) -> dict[str, Any]:
    lines = [x for x in log.strip().splitlines() if x.strip() and not x.startswith("[transformers]")]
    return {"ok": False, "error": (lines[-1] if lines else "no output")[:300]}


def _full(model: Path, data: Path, out: Path) -> dict[str, Any]:
    code, log, secs = _cli(_train_args(model, data, out, "full"))
    if code:
        return _fail(log)
    losses = _losses(out / "full")
    attn = next(
        (x.split("attention: ")[1].split(" |")[0] for x in log.splitlines() if "attention: " in x), "?"
    )
    return {"ok": True, "first_loss": losses[0], "last_loss": losses[-1], "seconds": secs, "attention": attn}


def _reload(run: Path) -> dict[str, Any]:
    """Plain transformers loads the export; weights and a batch's loss equal the run's model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run / "final"
    try:
        model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(final, local_files_only=True)
        saved = load_file(str(final / "model.safetensors"))
        state = model.state_dict()
        same = all(torch.equal(state[k], v) for k, v in saved.items() if k in state)
        ids = tok("add 12+34 = 46", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
    except Exception as err:  # what a user would see: any failure to load or run
        return {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return {"ok": same, "loss": loss, **({} if same else {"error": "weights differ from the export"})}


def _hft(model: Path, data: Path, out: Path) -> dict[str, Any]:
    code, log, _ = _cli([*_train_args(model, data, out, "hft"), "train.hft=true"])
    if code:
        return _fail(log)
    (entry, *_) = json.loads((out / "hft" / "final" / "hft_state.json").read_text())["history"]
    return {
        "ok": True,
        "fraction": entry["trainable_fraction"],
        "fused_parts_frozen": len(entry["frozen_parts"]),
    }


def _lora(model: Path, data: Path, out: Path) -> dict[str, Any]:
    code, log, _ = _cli([*_train_args(model, data, out, "lora"), "peft.method=lora"])
    if code:
        return _fail(log)
    adapter = json.loads((out / "lora" / "final" / "adapter_config.json").read_text())
    line = next((x for x in log.splitlines() if x.startswith("peft: lora,")), "")
    return {
        "ok": True,
        "adapter": line.removeprefix("peft: lora, "),
        "parameters_targeted": adapter.get("target_parameters"),
    }


def _two_ranks(strategy: str, model: Path, data: Path, out: Path) -> dict[str, Any]:
    args = _train_args(model, data, out, strategy)
    args = [a for a in args if not a.startswith("train.batch_size")] + ["train.batch_size=4"]
    code, log, secs = _cli([*args, f"dist.strategy={strategy}", "dist.nproc=2"], timeout=1200)
    if code:
        return _fail(log)
    losses = _losses(out / strategy)
    return {"ok": True, "first_loss": losses[0], "last_loss": losses[-1], "seconds": secs}


def _ddp(model: Path, data: Path, out: Path) -> dict[str, Any]:
    return _two_ranks("ddp", model, data, out)


def _fsdp(model: Path, data: Path, out: Path) -> dict[str, Any]:
    return _two_ranks("fsdp", model, data, out)


def _estimate(family: str, root: Path) -> dict[str, Any]:
    larger = save_family(family, root / f"{family}-larger", **LARGER_BY_FAMILY.get(family, LARGER))
    config = json.loads((larger / "config.json").read_text())
    setup = [
        "--optim",
        "adalomo",
        "--dtype",
        "fp32",
        "--seq",
        str(ESTIMATE_SEQ),
        "--batch",
        str(ESTIMATE_BATCH),
    ]
    code, log, _ = _cli(["estimate", "--model", str(larger), *setup, "--json"])
    if code:
        return _fail(log)
    predicted = json.loads(log[log.index("{") :])
    payload = {"preset": None, "optim": "adalomo", "dtype": "fp32", "seq": ESTIMATE_SEQ}
    payload |= {
        "batch": ESTIMATE_BATCH,
        "ckpt": False,
        "accum": 1,
        "threads": 1,
        "steps": 2,
        "hf_config": config,
    }
    try:
        measured = ev.measure_in_subprocess(payload, "estimate", threads=1, env=ENV)["peak_rss"]
    except benchlib.WorkerError as err:
        return _fail(err.stderr)
    return {
        "ok": True,
        "parameters": predicted["parameters"],
        "predicted": predicted["total"],
        "measured": measured,
        "error": (predicted["total"] - measured) / measured,
        "activations": predicted["activations"],
    }


def run_family(family: str, root: Path, skip: set[str]) -> dict[str, Any]:
    model = save_family(family, root / family)
    data = root / "chat.jsonl"
    out = root / "runs" / family
    row: dict[str, Any] = {"family": family}
    row["full"] = _full(model, data, out) if "full" not in skip else None
    row["reload"] = (
        _reload(out / "full") if row["full"] and row["full"]["ok"] and "reload" not in skip else None
    )
    for col, fn in (("hft", _hft), ("lora", _lora), ("ddp", _ddp), ("fsdp", _fsdp)):
        row[col] = fn(model, data, out) if col not in skip else None
    row["estimate"] = _estimate(family, root) if "estimate" not in skip else None
    return row


def _cell(col: str, cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "–"
    if not cell["ok"]:
        return f"FAIL: {cell.get('error', '')[:60]}"
    match col:
        case "full" | "ddp" | "fsdp":
            return f"ok, loss {cell['first_loss']:.2f} → {cell['last_loss']:.2f}"
        case "reload":
            return "ok"
        case "hft":
            parts = f", {cell['fused_parts_frozen']} fused parts" if cell["fused_parts_frozen"] else ""
            return f"ok, {cell['fraction']:.1%} trainable{parts}"
        case "lora":
            return "ok" + (", experts too" if cell.get("parameters_targeted") else "")
        case "estimate":
            mib = f"{cell['predicted'] / 2**20:.0f} vs {cell['measured'] / 2**20:.0f} MiB"
            return f"{cell['error'] * 100:+.1f}% ({mib})"
    return "ok"


def format_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    ok = {c: sum(1 for r in rows if r.get(c) and r[c]["ok"]) for c in COLUMNS}
    ran = {c: sum(1 for r in rows if r.get(c) is not None) for c in COLUMNS}
    errors = [abs(r["estimate"]["error"]) for r in rows if r.get("estimate") and r["estimate"]["ok"]]
    lines = [
        "# Every model family through the CLI",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; {report['machine']['cpu_model']}, {report['machine']['cpus']} CPUs; "
        f"torch {report['machine']['torch']}, transformers {report['machine']['transformers']}.",
        benchlib.source_note(report.get("source")),
        *([f"- Note: {report['note']}."] if report.get("note") else []),
        *(
            f"- Other columns from an earlier run: `{h['command']}` ({h['date']}); "
            + benchlib.source_note(h.get("source")).removeprefix("- ")
            + (f" Note: {h['note']}." if h.get("note") else "")
            for h in report.get("history", [])
        ),
        "",
        "Tiny random models (2 layers, hidden 64) with a BPE tokenizer and a Llama-3-style chat template,",
        "trained 20 steps on chat data from the CLI; `estimate`: `leantune estimate --model DIR` for a",
        "4-layer, hidden-512 model of the family (AdaLomo, fp32, "
        f"seq {ESTIMATE_SEQ} x batch {ESTIMATE_BATCH}) against its measured peak RSS",
        "over two steps (`MALLOC_MMAP_THRESHOLD_` fixed, as in `estimate_validation.md`).",
        "",
        "| family | full | HF reload | HFT | LoRA (all-linear) | ddp (2 ranks) | fsdp (2 ranks) "
        "| estimate error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['family']} | " + " | ".join(_cell(c, r.get(c)) for c in COLUMNS) + " |")
    lines += [
        "",
        "Passed: " + ", ".join(f"{c} {ok[c]}/{ran[c]}" for c in COLUMNS if ran[c]) + ".",
    ]
    if errors:
        lines.append(
            f"Estimate: max |error| {max(errors) * 100:.1f}%, mean {sum(errors) / len(errors) * 100:.1f}%."
        )
    return "\n".join(lines) + "\n"


def _merge(saved: dict[str, Any], new: dict[str, Any], skip: set[str]) -> dict[str, Any]:
    """The saved report with the re-run columns of ``new`` written over it; the earlier runs are
    kept as ``history`` so the report still says which command and code produced each column."""
    by_family = {r["family"]: r for r in saved["rows"]}
    for row in new["rows"]:
        kept = by_family.setdefault(row["family"], {"family": row["family"]})
        kept.update({c: row[c] for c in COLUMNS if c not in skip})
    history = [*saved.get("history", []), {k: saved.get(k) for k in ("command", "date", "source", "note")}]
    return {**new, "rows": list(by_family.values()), "history": history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated families (default: all)")
    parser.add_argument("--skip", default="", help=f"comma-separated columns to skip ({', '.join(COLUMNS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--from-json", type=Path, help="rewrite <out>.md from a saved <out>.json, no runs")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the saved <out>.json's cells for the skipped columns (re-run only the others)",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        args.out.with_suffix(".md").write_text(format_markdown(json.loads(args.from_json.read_text())))
        return 0
    families = [f.strip() for f in args.only.split(",")] if args.only else list(FAMILIES)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = [f for f in families if f not in FAMILIES] + [s for s in skip if s not in COLUMNS]
    if bad:
        known = f"families: {', '.join(FAMILIES)}; columns: {', '.join(COLUMNS)}"
        print(f"unknown families or columns {bad}; {known}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_chat_data(root / "chat.jsonl", n=128)
        for family in families:
            t0 = time.time()
            rows.append(run_family(family, root, skip))
            cells = " | ".join(_cell(c, rows[-1].get(c)) for c in COLUMNS)
            print(f"{family}: {cells} ({time.time() - t0:.0f} s)", flush=True)
    report = {
        "command": "python benchmarks/families.py" + (" " + " ".join(argv) if argv else ""),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": benchlib.machine(),
        "source": benchlib.source(),
        "rows": rows,
    }
    if args.merge:
        report = _merge(json.loads(args.out.with_suffix(".json").read_text()), report, skip)
    benchlib.write_report(args.out, report, format_markdown(report))
    print(f"wrote {args.out}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
