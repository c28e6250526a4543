"""KV-cache policies on multi-query associative recall (issue 22): recall accuracy and KV-cache bytes
under eviction, and recall past the training length.

    python benchmarks/kv_recall.py --run runs/recall         # a model trained on the recall task
    python benchmarks/kv_recall.py --train-steps 1200        # train one first (TRAIN_ARGS)

Model: trained by ``leantune train`` on the built-in ``recall`` task with its partner ``copy``
(``data.tasks=[recall,copy]``, see ``TRAIN_ARGS``; on ``recall`` alone the tiny model stays on a
plateau): prompts of T characters (T = ``leantune.data.tasks.RECALL_LENGTH``, one token each
under the byte-level tokenizer) with key-digit pairs in filler and the keys queried at the end.
Every policy answers the same prompts (seeded per length); answers are greedy; the first answer
comes from the prefill over the whole prompt, the later ones from the cache the policy kept.

* Eviction, at length T: ``full`` and, at 0/50/80/90% eviction (``--kv-budget`` 1.0/0.5/0.2/0.1 of
  the prompt), ``nacl``, ``proxy-only`` (nacl, random fraction 0), ``random-only`` (nacl, random
  fraction 1: drawn with probability softmax(score)), ``random`` (uniform) and ``streaming`` (sink +
  recent). Short prompts need small windows: ``--sink``, ``--recent`` and ``--proxies`` (defaults
  1, 4 and 4; 90% eviction of a 65-token prompt keeps 6).
* Length: T, 2T, 4T and 8T for ``full``, ``streaming`` (a window of T tokens) and ``longcache``
  (positions re-assigned below T: global 4 + clip x span + local <= T; spans of 2 tokens, a
  key-value pair's size: spans of 4 kept 78% at 8T against 94% at T, spans of 2 94% against 100%).

Reported: answer accuracy (share of queries answered right), exact prompts (every answer right),
mean KV-cache bytes after the prefill and their share of the full cache's. Goals (issue 22): NACL at
80% eviction keeps >= 90% of full-cache accuracy and beats streaming and random; LongCache keeps
>= 90% of its in-length accuracy at 8T where full attention collapses. Results:
``benchmarks/results/kv_recall.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

RESULTS = Path(__file__).resolve().parent / "results"
EVICTIONS = (0, 50, 80, 90)
EVICTING = ("nacl", "proxy-only", "random-only", "random", "streaming")
LENGTH_POLICIES = ("full", "streaming", "longcache")
MULTIPLES = (1, 2, 4, 8)
TRAIN_ARGS = [
    "model.preset=tiny",
    "data.tasks=[recall,copy]",
    "data.max_length=72",
    "data.num_train=60000",
    "data.num_eval=200",
    "train.batch_size=32",
    "eval.every=150",
    "eval.max_new_tokens=32",
]
"""``leantune train`` settings of the recall model (``train.max_steps`` from ``--train-steps``)."""


def train(work: Path, steps: int) -> tuple[Path, float]:
    """``leantune train`` on the recall task; (run directory, seconds)."""
    cmd = [sys.executable, "-m", "leantune", "train", *TRAIN_ARGS, f"train.max_steps={steps}",
           f"train.output_dir={work}", "train.run_name=recall", "train.device=cpu",
           "log.progress=false", "log.tensorboard=false", "log.plot=false"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return work / "recall", time.perf_counter() - t0


def _run_args(run: Path) -> list[str]:
    """``TRAIN_ARGS`` with the steps and seed a given run directory was trained with."""
    import yaml

    config = run / "config.yaml"
    if not config.is_file():
        return list(TRAIN_ARGS)
    train_cfg = (yaml.safe_load(config.read_text()) or {}).get("train", {})
    extra = [f"train.{k}={train_cfg[k]}" for k in ("max_steps", "seed") if k in train_cfg]
    return [*TRAIN_ARGS, *extra]


def _policy(name: str, budget: float | int | None, args: argparse.Namespace, length: int):
    from leantune.kvcache import KVPolicy
    from leantune.kvcache.longcache import LongCacheConfig

    w = {"sink": args.sink, "recent": args.recent, "proxies": args.proxies, "seed": args.seed}
    if name == "full":
        return KVPolicy("full")
    if name == "longcache":
        local = length // 2
        clip = max(1, (length - 4 - local) // 2)
        cfg = LongCacheConfig(
            global_size=4, local_size=local, span=2, topk=2, clip=clip, chunk=min(16, local)
        )
        return KVPolicy("longcache", longcache=cfg, train_length=length)
    if name == "streaming":
        return KVPolicy("streaming", budget=budget, sink=w["sink"], seed=w["seed"])
    if name == "random":
        return KVPolicy("random", budget=budget, sink=w["sink"], recent=w["recent"], seed=w["seed"])
    fraction = {"nacl": 0.37, "proxy-only": 0.0, "random-only": 1.0}[name]
    return KVPolicy("nacl", budget=budget, random_fraction=fraction, **w)


def measure(args: argparse.Namespace, run: Path) -> dict[str, Any]:
    import torch

    from leantune.data.tasks import RECALL_LENGTH
    from leantune.inference import load_for_inference
    from leantune.longctx.recall import evaluate_recall

    torch.set_num_threads(args.threads)
    loaded = load_for_inference(run, device=torch.device("cpu"))
    model, tok = loaded.model, loaded.tokenizer
    length = args.length or RECALL_LENGTH

    def one(policy, lengths, late: bool = False) -> dict[str, Any]:
        res = evaluate_recall(
            model, tok, lengths, samples=args.samples, seed=args.seed, kv=policy, late_queries=late
        )
        d = res.to_dict()
        d.pop("records")
        return d

    def evictions(late: bool) -> dict[str, Any]:
        out = {"full": one(_policy("full", None, args, length), [length], late)}
        for name in EVICTING:
            for ev in EVICTIONS:
                budget = round(1 - ev / 100, 2)
                policy = _policy(name, budget if budget < 1 else 1.0, args, length)
                out[f"{name}@{ev}"] = one(policy, [length], late)
                when = " (late queries)" if late else ""
                print(f"{name} @ {ev}%{when}: {out[f'{name}@{ev}']['accuracy'][0]:.1%}", flush=True)
        return out

    eviction, late = evictions(False), evictions(True)
    lengths = [length * m for m in MULTIPLES]
    by_length = {}
    for name in LENGTH_POLICIES:
        by_length[name] = one(_policy(name, length if name == "streaming" else None, args, length), lengths)
        print(f"{name} by length: {[round(a, 3) for a in by_length[name]['accuracy']]}", flush=True)
    return {"length": length, "samples": args.samples, "eviction": eviction, "late": late,
            "by_length": by_length}  # fmt: skip


def goals(report: dict[str, Any]) -> dict[str, bool]:
    """The issue's goals, each true or false, from a report's results."""
    r = report["results"]
    ev, bl = r["eviction"], r["by_length"]
    acc = {k: v["accuracy"][0] for k, v in ev.items()}
    full = acc["full"]
    lc, fa = bl["longcache"]["accuracy"], bl["full"]["accuracy"]
    out = {
        "model_reaches_90pct": full >= 0.9,
        "nacl_80_keeps_90pct": acc["nacl@80"] >= 0.9 * full,
        "nacl_80_beats_streaming": acc["nacl@80"] > acc["streaming@80"],
        "nacl_80_beats_random": acc["nacl@80"] > max(acc["random-only@80"], acc["random@80"]),
    }
    if "late" in r:
        late = {k: v["accuracy"][0] for k, v in r["late"].items()}
        out["late_nacl_80_keeps_90pct"] = late["nacl@80"] >= 0.9 * late["full"]
        out["late_nacl_80_beats_streaming"] = late["nacl@80"] > late["streaming@80"]
        out["late_nacl_80_beats_random"] = late["nacl@80"] > max(late["random-only@80"], late["random@80"])
    out["longcache_8x_keeps_90pct"] = lc[-1] >= 0.9 * lc[0]
    out["full_collapses_8x"] = fa[-1] < 0.5 * fa[0]
    return out


GOAL_TEXT = {
    "model_reaches_90pct": "the model reaches >= 90% recall at its training length (full cache)",
    "nacl_80_keeps_90pct": "NACL at 80% eviction keeps >= 90% of the full cache's accuracy",
    "nacl_80_beats_streaming": "NACL at 80% eviction beats streaming",
    "nacl_80_beats_random": "NACL at 80% eviction beats random (random-only and uniform)",
    "late_nacl_80_keeps_90pct": "queries after eviction: NACL at 80% keeps >= 90% of the full cache's",
    "late_nacl_80_beats_streaming": "queries after eviction: NACL at 80% beats streaming",
    "late_nacl_80_beats_random": "queries after eviction: NACL at 80% beats random (random-only and uniform)",
    "longcache_8x_keeps_90pct": "LongCache keeps >= 90% of its in-length accuracy at 8x",
    "full_collapses_8x": "full attention collapses at 8x (below half its in-length accuracy)",
}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _later(d: dict[str, Any], i: int = 0) -> str:
    """Accuracy of the answers after the first (the ones decoded from the kept cache)."""
    per = d.get("by_query") or []
    if not per or len(per[i]) < 2:
        return "–"
    n = d.get("samples", 0) * (len(per[i]) - 1)
    return _pct(sum(per[i][1:]) / n) if n else "–"


def _first(d: dict[str, Any], i: int = 0) -> str:
    per = d.get("by_query") or []
    return _pct(per[i][0] / d["samples"]) if per and d.get("samples") else "–"


def _eviction_rows(ev: dict[str, Any]) -> list[list[str]]:
    full_bytes = ev["full"]["kv_bytes"][0]
    f0 = ev["full"]
    rows = [["full", "0%", _pct(f0["accuracy"][0]), _first(f0), _later(f0), _pct(f0["exact_accuracy"][0]),
             f"{full_bytes:.0f}", "100%"]]  # fmt: skip
    for name in EVICTING:
        for e in EVICTIONS:
            d = ev[f"{name}@{e}"]
            rows.append([name, f"{e}%", _pct(d["accuracy"][0]), _first(d), _later(d),
                         _pct(d["exact_accuracy"][0]), f"{d['kv_bytes'][0]:.0f}",
                         _pct(d["kv_bytes"][0] / full_bytes)])  # fmt: skip
    return rows


EVICTION_HEADER = [
    "policy",
    "eviction",
    "accuracy",
    "1st answer",
    "later answers",
    "exact",
    "KV bytes",
    "of full",
]


def render(report: dict[str, Any]) -> str:
    r = report["results"]
    ev, bl, t = r["eviction"], r["by_length"], r["length"]
    rows = _eviction_rows(ev)
    lrows = []
    for name in LENGTH_POLICIES:
        d = bl[name]
        for i, m in enumerate(MULTIPLES):
            lrows.append([name, f"{m}x", str(d["lengths"][i]), _pct(d["accuracy"][i]), _first(d, i),
                          _later(d, i), _pct(d["exact_accuracy"][i]), f"{d['kv_bytes'][i]:.0f}"])  # fmt: skip
    g = report.get("goals") or goals(report)
    queries = len((ev["full"].get("by_query") or [[0, 0]])[0])
    answers = r["samples"] * queries
    se = (0.25 / max(1, answers)) ** 0.5
    caveat = "" if g.get("model_reaches_90pct") else " (not meaningful: the model does not recall)"
    tr = report.get("training", {})
    lines = [
        "# KV-cache policies on multi-query associative recall\n",
        f"Model: {tr.get('description', 'a recall model')}. Training length T = {t} characters "
        f"(tokens under the byte tokenizer, + bos). {r['samples']} prompts per cell, the same prompts for "
        "every policy; answers greedy; accuracy = share of queries answered right, exact = prompts "
        "with every answer right. The first answer comes from the prefill over the whole prompt (no "
        "policy changes it at the training length), the later ones from the kept cache. Windows: sink "
        f"{report['windows']['sink']}, recent "
        f"{report['windows']['recent']}, proxies {report['windows']['proxies']}.\n",
        "## Eviction at the training length\n",
        f"Noise: one standard error of an accuracy near 50% over {answers} answers is "
        f"{100 * se:.1f} points. Chance: 10% per answer guessing a digit, about 25-30% picking one of the "
        "values present in the prompt.\n",
        benchlib.render_table(EVICTION_HEADER, rows, "llrrrrrr"),
        *(
            [
                "\n## Eviction with the queries after the prefill\n",
                "The prefill holds the filler and pairs up to the newline (the budget is a share of "
                "that); the policy evicts, then the queried keys and `=` are fed through the kept "
                "cache and every answer is decoded from it: the policy does not know the question.\n",
                benchlib.render_table(EVICTION_HEADER, _eviction_rows(r["late"]), "llrrrrrr"),
            ]
            if "late" in r
            else []
        ),
        "\n## Past the training length\n",
        "streaming keeps a window of T tokens (sink + recent); longcache re-assigns positions below T "
        f"(global 4, local {t // 2}, span 2, top-k 2, {(t - 4 - t // 2) // 2} spans).\n",
        benchlib.render_table(
            [
                "policy",
                "length",
                "characters",
                "accuracy",
                "1st answer",
                "later answers",
                "exact",
                "KV bytes",
            ],
            lrows,
            "llrrrrrr",
        ),
        "\n## Goals\n",
        *[
            f"- {GOAL_TEXT[k]}: {'met' if ok else 'NOT met'}{caveat if k != 'model_reaches_90pct' else ''}"
            for k, ok in g.items()
        ],  # fmt: skip
    ]
    missing = [GOAL_TEXT[k] for k, ok in g.items() if not ok or caveat]
    lines.append("\nNot reproduced: " + ("; ".join(missing) if missing else "nothing") + ".")
    if report.get("notes"):
        lines.append("\n" + report["notes"])
    load = benchlib.format_load(report.get("load"))
    lines.append(f"\nMachine: {report['machine'].get('cpu_model', '?')}, load {load}.")
    lines.append(benchlib.source_note(report.get("source")))
    return "\n".join(lines) + "\n"


def fake_report() -> dict[str, Any]:
    """A small made-up report in the real one's shape (for the rendering test)."""

    def cell(acc: list[float], nbytes: list[float], lengths: list[int]) -> dict[str, Any]:
        return {
            "lengths": lengths,
            "samples": 10,
            "accuracy": acc,
            "exact_accuracy": [a * a for a in acc],
            "kv_bytes": nbytes,
            "by_query": [[round(10 * a), round(10 * a)] for a in acc],
        }

    ev = {"full": cell([0.8], [1000.0], [64])}
    for name in EVICTING:
        for e in EVICTIONS:
            ev[f"{name}@{e}"] = cell(
                [0.8 - e / 200 + (0.05 if name == "nacl" else 0)], [1000.0 * (1 - e / 100)], [64]
            )
    bl = {n: cell([0.8, 0.6, 0.4, 0.2 if n != "longcache" else 0.75], [1000.0, 2000.0, 4000.0, 8000.0],
                  [64, 128, 256, 512]) for n in LENGTH_POLICIES}  # fmt: skip
    return {
        "results": {"length": 64, "samples": 10, "eviction": ev, "late": ev, "by_length": bl},
        "windows": {"sink": 1, "recent": 4, "proxies": 4},
        "machine": {"cpu_model": "test cpu"},
        "load": [1.0, 1.0, 1.0],
        "source": None,
        "training": {"description": "a fake model"},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a model trained on the recall task (default: train one)")
    ap.add_argument("--train-steps", type=int, default=1200, help="steps when training here (default 1200)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/leantune-bench-kv-recall"))
    ap.add_argument("--length", type=int, help="training length T (default: the recall task's)")
    ap.add_argument("--samples", type=int, default=100, help="prompts per cell (default 100)")
    ap.add_argument("--sink", type=int, default=1)
    ap.add_argument("--recent", type=int, default=4)
    ap.add_argument("--proxies", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--notes", default="", help="a paragraph added to the report (e.g. how the model was trained)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_recall")
    ap.add_argument("--render", action="store_true", help="rewrite the .md from the --out .json only")
    args = ap.parse_args(argv)
    if args.render:
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(render(report))
        return 0
    run, train_s = args.run, None
    if run is None:
        run, train_s = train(args.work, args.train_steps)
    if train_s is None:
        summary = run / "summary.json"
        train_s = json.loads(summary.read_text()).get("train_seconds") if summary.is_file() else None
    train_args = _run_args(run)
    results = measure(args, run)
    report = {
        "machine": benchlib.machine(),
        "source": benchlib.source(),
        "load": benchlib.loadavg(),
        "threads": args.threads,
        "windows": {"sink": args.sink, "recent": args.recent, "proxies": args.proxies},
        "training": {
            "run": str(run),
            "seconds": train_s,
            "args": train_args,
            "description": f"`{run}` (leantune train {' '.join(train_args)})",
        },  # fmt: skip
        "notes": args.notes,
        "results": results,
    }
    report["goals"] = goals(report)
    benchlib.write_report(args.out, report, render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
