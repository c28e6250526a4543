"""Speculative decoding: plain decoding (ar), transformers' assisted generation, standard SD and
DuoDecoding on a target/draft pair trained here on the same data (issue 20).

    python benchmarks/speculative.py [--prompts 20] [--new-tokens 32] [--steps 200]
    python benchmarks/speculative.py --target RUN --draft RUN      # reuse trained runs

Models: the target is the ``tiny`` preset (4 layers, d=128), the draft the ``test`` preset
(2 layers, d=32), both trained with ``leantune train`` on the built-in tasks for ``--steps``
steps (the training time is reported). Prompts: held-out built-in task prompts; every method
generates ``--new-tokens`` greedy tokens per prompt *ignoring eos* (the task answers are only a
few tokens long, too short to tell the methods apart). All outputs are checked token-identical.

Reported, per method:

* acceptance rate (draft tokens kept / proposed), tokens committed per target forward;
* wall clock on this machine: tokens/s and time to first token (TTFT), torch with ``--threads``
  intra-op threads (DuoDecoding's two threads then take one core each);
* a virtual clock (:mod:`leantune.speculative.clock`) at target:draft forward-cost ratios 5, 10
  and 20: each target forward costs ``ratio`` units and each draft forward 1, whatever the number
  of tokens (a GPU target verifying a few tokens costs about one decoding step); sequential
  methods add the costs, DuoDecoding's two lanes overlap (a round costs the slower lane). One run
  per configuration prices all three ratios (the greedy schedule does not depend on time). Sweeps
  of gamma for SD and DuoDecoding give the best fixed gamma to set against gamma*.

Goals (issue 20): duo >= 1.5x ar tokens/s (wall), >= 2x at virtual ratio 10, TTFT <= SD's, gamma*
within 20% of the best fixed gamma. Results: ``benchmarks/results/speculative.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (5, 10, 20)
SD_GAMMAS = (1, 2, 3, 4, 5, 6, 8)
DUO_GAMMAS = (1, 2, 4, 5, 6, 8, 10, 12, 16, 20, 24)


def train(work: Path, name: str, preset: str, steps: int) -> tuple[Path, float]:
    """``leantune train`` of ``preset`` on the built-in tasks; (run directory, seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "leantune",
        "train",
        f"model.preset={preset}",
        f"train.max_steps={steps}",
        f"train.output_dir={work}/runs",
        f"train.run_name={name}",
        "train.device=cpu",
        "eval.every=0",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return work / "runs" / name, time.perf_counter() - t0


def _prompts(tokenizer: Any, n: int) -> list[list[int]]:
    from leantune.config import DataConfig
    from leantune.data import build_datasets

    samples = build_datasets(DataConfig(), tokenizer).eval
    return [list(s.prompt_ids) for s in samples if s.prompt_ids is not None][:n]


class _FirstToken:
    """A transformers streamer that records when the first new tokens arrive (the first ``put``
    is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.t_first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.t_first is None:
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass


def _assisted(target, draft, prompts: list[list[int]], n_new: int) -> dict[str, Any]:
    import torch

    toks, ttft, wall = [], [], 0.0
    for p in prompts:
        x = torch.tensor([p])
        s = _FirstToken()
        t0 = time.perf_counter()
        out = target.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            assistant_model=draft,
            do_sample=False,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            eos_token_id=None,
            pad_token_id=0,
            streamer=s,
        )
        wall += time.perf_counter() - t0
        ttft.append((s.t_first or time.perf_counter()) - t0)
        toks.append(out[0, len(p) :].tolist())
    n = sum(map(len, toks))
    return {"tokens": toks, "tokens_per_s": n / wall, "ttft_ms": 1e3 * sum(ttft) / len(ttft), "wall_s": wall}


def _run(method: str, target, draft, prompts, n_new: int, gamma: int, clock_factory=None, **kw) -> dict:
    from leantune.speculative import generate

    toks, stats, marks = [], [], []
    for p in prompts:
        clock = clock_factory() if clock_factory else None
        res = generate(method, target, draft, p, max_new_tokens=n_new, gamma=gamma, clock=clock, **kw)
        toks.append(res.tokens)
        stats.append(res.stats)
        if clock is not None:
            marks.append((clock.marks[0], clock.marks[-1]))
    n = sum(s.new_tokens for s in stats)
    wall = sum(s.wall_s for s in stats)
    drafted = sum(s.drafted for s in stats)
    k_hist: dict[int, int] = {}
    for s in stats:
        for k, v in s.k_hist.items():
            k_hist[k] = k_hist.get(k, 0) + v
    out = {
        "tokens": toks,
        "gamma": gamma,
        "tokens_per_s": n / wall,
        "ttft_ms": 1e3 * sum(s.ttft_s for s in stats) / len(stats),
        "wall_s": wall,
        "acceptance_rate": sum(s.accepted for s in stats) / drafted if drafted else None,
        "tokens_per_target_forward": n / sum(s.target_forwards for s in stats),
        "draft_forwards": sum(s.draft_forwards for s in stats),
        "target_forwards": sum(s.target_forwards for s in stats),
        "k_hist": k_hist,
        "first_token_hit_rate": (
            sum(s.first_hits for s in stats) / max(1, sum(s.first_checks for s in stats))
            if method == "duo"
            else None
        ),
    }
    if marks:  # virtual figures per ratio: tokens per unit of draft-forward time, TTFT in units
        out["virtual"] = {
            str(r): {
                "tokens_per_unit": n / sum(m[1][i] for m in marks),
                "ttft_units": sum(m[0][i] for m in marks) / len(marks),
            }
            for i, r in enumerate(RATIOS)
        }
    return out


def measure(args: argparse.Namespace, target_dir: Path, draft_dir: Path) -> dict[str, Any]:
    import torch

    from leantune.inference import load_for_inference
    from leantune.speculative import check_compatible, profile_models
    from leantune.speculative.clock import ClockSet, VirtualClock

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    tl, dl = load_for_inference(target_dir, device=cpu), load_for_inference(draft_dir, device=cpu)
    target, draft = tl.model, dl.model
    check_compatible(target, draft, tl.tokenizer, dl.tokenizer)
    prompts = _prompts(tl.tokenizer, args.prompts)
    n_new = args.new_tokens
    prof = profile_models(target, draft, repeats=7)
    print(f"profile: {prof.describe()}", flush=True)
    wall: dict[str, Any] = {}
    _run("ar", target, None, prompts[:2], n_new, 0)  # warm-up
    wall["ar"] = _run("ar", target, None, prompts, n_new, 0)
    wall["assisted"] = _assisted(target, draft, prompts, n_new)
    wall["sd"] = _run("sd", target, draft, prompts, n_new, 5)
    wall["duo"] = _run("duo", target, draft, prompts, n_new, prof.gamma)
    wall["duo-serial"] = _run("duo", target, draft, prompts, n_new, prof.gamma, parallel=False)
    print({k: round(v["tokens_per_s"], 1) for k, v in wall.items()}, flush=True)

    def clocks() -> ClockSet:
        return ClockSet([VirtualClock.ratio(r, 1.0) for r in RATIOS])

    virtual: dict[str, Any] = {"ar": _run("ar", target, None, prompts, n_new, 0, clocks)}
    for g in SD_GAMMAS:
        virtual[f"sd-{g}"] = _run("sd", target, draft, prompts, n_new, g, clocks)
    for g in DUO_GAMMAS:
        virtual[f"duo-{g}"] = _run("duo", target, draft, prompts, n_new, g, clocks, parallel=False)
    print("virtual runs done", flush=True)
    ref = wall["ar"]["tokens"]
    identical = {k: v["tokens"] == ref for k, v in {**wall, **virtual}.items()}
    for d in (*wall.values(), *virtual.values()):
        d.pop("tokens")
    return {
        "profile": {
            "t_draft_ms": prof.t_draft * 1e3,
            "t_verify_ms": prof.t_verify * 1e3,
            "gamma_star": prof.gamma,
        },
        "wall": wall,
        "virtual": virtual,
        "identical_to_ar": identical,
        "prompts": len(prompts),
        "new_tokens": n_new,
    }


def _f(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def render(report: dict[str, Any]) -> str:
    r = report["results"]
    wall, virt, prof, ts = r["wall"], r["virtual"], r["profile"], report["train_s"]
    ar = wall["ar"]["tokens_per_s"]
    lines = [
        "# Speculative decoding: ar, assisted, SD, DuoDecoding\n",
        f"Target `tiny` preset, draft `test` preset, both trained {report['steps']} steps on the built-in "
        f"tasks (target {_f(ts['target'], '.0f')} s, draft {_f(ts['draft'], '.0f')} s). "
        f"{r['prompts']} held-out prompts x {r['new_tokens']} greedy tokens (eos ignored). "
        f"Every method's tokens identical to ar: {all(r['identical_to_ar'].values())}.\n",
        f"Profile: draft {prof['t_draft_ms']:.2f} ms/token, target verification {prof['t_verify_ms']:.2f} ms "
        f"-> gamma* = {prof['gamma_star']}.\n",
        "## Wall clock (this machine)\n",
        benchlib.render_table(
            ["method", "gamma", "tokens/s", "x ar", "TTFT ms", "acceptance", "tokens/target fwd"],
            [
                [
                    k,
                    str(v.get("gamma", "")),
                    f"{v['tokens_per_s']:.1f}",
                    f"{v['tokens_per_s'] / ar:.2f}",
                    f"{v['ttft_ms']:.1f}",
                    _f(v.get("acceptance_rate")),
                    _f(v.get("tokens_per_target_forward")),
                ]
                for k, v in wall.items()
            ],
            "llrrrrr",
        ),
        "\n## Virtual clock (draft forward = 1 unit, target forward = ratio units)\n",
    ]
    rows = []
    for k, v in virt.items():
        row = [k, _f(v["acceptance_rate"]), _f(v["tokens_per_target_forward"])]
        for ratio in RATIOS:
            vr, base = v["virtual"][str(ratio)], virt["ar"]["virtual"][str(ratio)]
            row += [f"{vr['tokens_per_unit'] / base['tokens_per_unit']:.2f}", f"{vr['ttft_units']:.1f}"]
        rows.append(row)
    heads = ["config", "acceptance", "tokens/target fwd"]
    for ratio in RATIOS:
        heads += [f"x ar @{ratio}", f"TTFT @{ratio}"]
    lines.append(benchlib.render_table(heads, rows, "l" + "r" * (len(heads) - 1)))
    lines.append("\n## Goals\n")
    for g in report["goals"]:
        lines.append(f"- {g}")
    lines.append("\n" + benchlib.source_note(report.get("source")))
    return "\n".join(lines) + "\n"


def goals(r: dict[str, Any]) -> list[str]:
    wall, virt = r["wall"], r["virtual"]
    out = []
    s = wall["duo"]["tokens_per_s"] / wall["ar"]["tokens_per_s"]
    out.append(f"duo >= 1.5x ar tokens/s (wall): {s:.2f}x, {'met' if s >= 1.5 else 'NOT met'}")
    best_duo = {}
    for ratio in RATIOS:
        base = virt["ar"]["virtual"][str(ratio)]["tokens_per_unit"]
        sp = {g: virt[f"duo-{g}"]["virtual"][str(ratio)]["tokens_per_unit"] / base for g in DUO_GAMMAS}
        best = max(sp, key=sp.get)
        best_duo[ratio] = (best, sp)
    g10, sp10 = best_duo[10]
    star = 10  # gamma* = floor(T_verify / t_draft) = the ratio on the virtual clock
    out.append(
        f"duo >= 2x ar at virtual ratio 10: gamma*=10 gives {sp10[star]:.2f}x (best fixed gamma {g10}: "
        f"{sp10[g10]:.2f}x), {'met' if sp10[star] >= 2 else 'NOT met'}"
    )
    tt_duo, tt_sd = wall["duo"]["ttft_ms"], wall["sd"]["ttft_ms"]
    out.append(
        f"TTFT duo <= SD (wall): {tt_duo:.1f} vs {tt_sd:.1f} ms, {'met' if tt_duo <= tt_sd else 'NOT met'}"
    )
    vt = [
        (virt[f"duo-{r}"]["virtual"][str(r)]["ttft_units"], virt["sd-5"]["virtual"][str(r)]["ttft_units"])
        for r in RATIOS
    ]
    ok = all(a <= b for a, b in vt)
    out.append(f"TTFT duo(gamma*) <= SD(5) (virtual, ratios {RATIOS}): {vt}, {'met' if ok else 'NOT met'}")
    for ratio in RATIOS:
        best, sp = best_duo[ratio]
        ok = abs(ratio - best) <= 0.2 * best
        near = sp[ratio] >= 0.95 * sp[best]
        out.append(
            f"gamma* within 20% of the best fixed gamma at ratio {ratio}: gamma*={ratio}, best {best} "
            f"({sp[ratio]:.2f}x vs {sp[best]:.2f}x): {'met' if ok else 'NOT met'}"
            + ("" if ok else f" on gamma; speed within 5% of the best: {'yes' if near else 'no'}")
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", help="a trained target run (default: train one)")
    ap.add_argument("--draft", help="a trained draft run (default: train one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/leantune-bench-speculative"))
    ap.add_argument("--steps", type=int, default=200, help="training steps of each model (default 200)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "speculative")
    args = ap.parse_args(argv)
    train_s = {"target": None, "draft": None}
    target, draft = args.target, args.draft
    if target is None:
        target, train_s["target"] = train(args.work, "target", "tiny", args.steps)
    if draft is None:
        draft, train_s["draft"] = train(args.work, "draft", "test", args.steps)
    for k in train_s:
        if train_s[k] is None:  # reused run: its own train_seconds
            train_s[k] = _train_seconds(Path(target if k == "target" else draft))
    results = measure(args, Path(target), Path(draft))
    report = {
        "machine": benchlib.machine(),
        "source": benchlib.source(),
        "load": benchlib.loadavg(),
        "steps": args.steps,
        "train_s": train_s,
        "threads": args.threads,
        "results": results,
    }
    report["goals"] = goals(results)
    benchlib.write_report(args.out, report, render(report))
    print("\n".join(report["goals"]))
    return 0


def _train_seconds(run: Path) -> float | None:
    from leantune.monitor import read_metrics

    try:
        records = read_metrics(run)
    except FileNotFoundError:
        return None
    times, total = [], None
    for rec in records:
        total = rec.get("train_seconds", total)
        if "time" in rec:
            times.append(float(rec["time"]))
    # no train_seconds record: the span of the logged steps (from the first log, so a lower bound)
    return float(total) if total is not None else (max(times) - min(times) if times else None)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
