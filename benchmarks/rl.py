"""PPO after SFT on a rule-based task: how many iterations to a held-out mean reward of 0.8, for
token-level PPO, MA-RLHF's fixed macro actions (n = 3, 5) and the lambda = 1 control; and the peak
memory of a PPO iteration with AdaLomo against AdamW.

    python benchmarks/rl.py [--only speed,memory] [--seeds 0,1,2] [--iterations 60]

Speed. The task: reverse a string of 6-10 letters from a 12-letter alphabet (``reverse
hfbkdla`` -> ``aldkbfh``); the reward, given only at the end, is the share of correct positions
(:func:`leantune.rl.rewards.builtin_tasks`; 1.0 only for the exact answer). The ``tiny`` preset is
first trained by SFT (AdaLomo, the default job's settings, a cosine schedule over 1600 steps of
32) on 6000 such pairs; PPO starts from its step-800 checkpoint (about half the held-out prompts
solved) with an AdaLomo policy and a separate critic initialised from those weights, 64 prompts per
rollout, 4 PPO epochs in minibatches of 32, lr 1e-3 constant, and PPO-max's defaults otherwise
except the advantage clip (off: a short sweep, in the notes, learned faster without it). Every 2
iterations it evaluates the greedy completions of 200 held-out prompts (unseen in SFT). Reported:
the first evaluated iteration with a mean held-out reward >= each target (or "> N" when never), per
seed and as the median, and the held-out reward at the first and last evaluation.

MA-RLHF's claim (arXiv 2410.02743): parity with token-level RLHF 1.7-2x faster. With lambda < 1,
fewer macro steps also mean less lambda-decay of the terminal reward: token-level PPO with
lambda = 1 is the control that separates the two.

Memory. Peak RSS (VmHWM) of one process running 2 PPO iterations on the ``0.1b`` preset (fp32,
~85 M parameters with the byte tokenizer; policy, reference and critic: three models), 8 prompts
of 16 new tokens, AdaLomo against AdamW for policy and critic.

Each run is a fresh subprocess (``benchlib.run_matrix``). Results: ``benchmarks/results/rl.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import benchlib

RESULTS = Path(__file__).resolve().parent / "results"
ALPHABET = "abcdefghijkl"
TARGETS = (0.8, 0.75)  # the target, and one within this budget
SPEED = {  # name -> overrides
    "token": ["rl.macro_action=none"],
    "macro-n3": ["rl.macro_action=ngram", "rl.ngram=3"],
    "macro-n5": ["rl.macro_action=ngram", "rl.ngram=5"],
    "token-lambda1": ["rl.macro_action=none", "rl.lam=1.0"],
}
MEMORY = {"adalomo": ["optim.name=adalomo"], "adamw": ["optim.name=adamw", "optim.lr=1e-5"]}


def make_data(work: Path, seed: int = 0) -> dict[str, Path]:
    """6000 SFT pairs and 200 held-out prompts (disjoint words)."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(6, 10)))

    held: dict[str, None] = {}
    while len(held) < 200:
        held[word()] = None
    train = []
    while len(train) < 6000:
        w = word()
        if w not in held:
            train.append(w)
    work.mkdir(parents=True, exist_ok=True)
    files = {"train": work / "train.jsonl", "heldout": work / "heldout.jsonl"}
    for key, words in (("train", train), ("heldout", list(held))):
        files[key].write_text(
            "".join(json.dumps({"prompt": f"reverse {w}", "response": w[::-1]}) + "\n" for w in words)
        )
    return files


def _common(work: str, name: str) -> list[str]:
    return ["train.device=cpu", "log.progress=false", "log.tensorboard=false", "log.plot=false",
            f"train.output_dir={work}/runs", f"train.run_name={name}"]  # fmt: skip


def worker(params: dict) -> None:
    import torch

    from leantune.config import load_config
    from leantune.rl.loop import PPOTrainer
    from leantune.trainer import Trainer

    torch.set_num_threads(params.get("threads", 2))
    cfg = load_config(None, params["overrides"])
    s = (PPOTrainer if cfg.train.objective == "ppo" else Trainer)(cfg).run()
    benchlib.emit_result(result_of(s.run_dir))


def result_of(run_dir: Path) -> dict:
    """What a finished run reports, read from its ``metrics.jsonl`` (the evaluation curve and the
    summary); ``{"error": ...}`` for a run that did not finish."""
    from leantune.monitor import read_metrics

    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        return {"error": "not run", "detail": str(run_dir)}
    summary = next((r for r in reversed(records) if r.get("kind") == "summary"), None)
    if summary is None:
        return {"error": "did not finish", "detail": str(run_dir)}
    evals = [r for r in records if r.get("kind") == "eval"]
    out = {
        "steps": summary["step"],
        "peak_rss_mib": summary["peak_mem_bytes"] / 2**20,
        "train_seconds": summary["train_seconds"],
        "curve": [[r["step"], r.get("eval_reward", r.get("acc"))] for r in evals],
    }
    for key in ("eval_reward", "eval_solved", "acc"):
        if key in summary:
            out[key] = summary[key]
    return out


def first_at(curve: list[list[float]], target: float) -> int | None:
    """The first evaluated iteration whose mean held-out reward is >= ``target``."""
    return next((int(step) for step, value in curve if value is not None and value >= target), None)


def collect(args: argparse.Namespace) -> dict:
    """The speed section from the run directories an earlier (possibly interrupted) call left:
    finished runs are read back, the others reported as not run."""
    runs = args.work / "runs"
    base = result_of(runs / "sft")
    start = args.sft_steps // 2
    base.update(start_step=start, start_acc=next((v for st, v in base.get("curve", []) if st == start), None))
    found = {}
    for seed in args.seeds:
        for name in SPEED:
            found[f"{name}/seed{seed}"] = result_of(runs / f"{name}-seed{seed}")
    return {"sft": base, "runs": found}


def speed(args: argparse.Namespace, files: dict[str, Path]) -> dict:
    work = str(args.work)
    start = args.sft_steps // 2
    sft = [
        *_common(work, "sft"), f"data.train={files['train']}", f"data.eval={files['heldout']}",
        f"train.max_steps={args.sft_steps}", "train.batch_size=32", f"eval.every={start}",
        f"train.save_every={start}", "train.keep_last=2", "eval.accuracy_samples=200", "log.every=100",
    ]  # fmt: skip
    base = benchlib.run_matrix(Path(__file__), {"sft": {"overrides": sft}}, timeout=args.timeout)["sft"][0]
    base["start_step"] = start
    base["start_acc"] = next((v for step, v in base.get("curve", []) if step == start), None)
    configs = {}
    for seed in args.seeds:
        for name, extra in SPEED.items():
            configs[f"{name}/seed{seed}"] = {
                "overrides": [
                    *_common(work, f"{name}-seed{seed}"),
                    f"model.path={work}/runs/sft/checkpoints/step-{start:06d}/model",
                    "train.objective=ppo", f"data.train={files['train']}", f"data.eval={files['heldout']}",
                    f"train.seed={seed}", f"train.max_steps={args.iterations}", "train.batch_size=64",
                    "rl.minibatch_size=32", "rl.ppo_epochs=4", "rl.advantage_clip=null",
                    "rl.max_new_tokens=12",
                    f"optim.lr={args.lr}", "optim.scheduler=constant", "optim.warmup_steps=0", "eval.every=2",
                    "eval.accuracy_samples=200", "log.every=10", *extra,
                ]  # fmt: skip
            }
    runs = benchlib.run_matrix(Path(__file__), configs, timeout=args.timeout)
    return {"sft": base, "runs": {k: v[0] for k, v in runs.items()}}


def memory(args: argparse.Namespace, files: dict[str, Path]) -> dict:
    work = str(args.work)
    configs = {
        name: {
            "overrides": [
                *_common(work, f"mem-{name}"),
                "model.preset=0.1b",
                "train.objective=ppo",
                f"data.train={files['heldout']}",
                "data.num_eval=0",
                "train.max_steps=2",
                "train.batch_size=8",
                "rl.max_new_tokens=16",
                "eval.accuracy_samples=0",
                "log.every=1",
                *extra,
            ]  # fmt: skip
        }
        for name, extra in MEMORY.items()
    }
    return {k: v[0] for k, v in benchlib.run_matrix(Path(__file__), configs, timeout=args.timeout).items()}


def render(report: dict) -> str:
    lines = ["# PPO and MA-RLHF after SFT (issue 18)", "", benchlib.source_note(report.get("source")), ""]
    s = report.get("speed")
    if s:
        sft = s["sft"]
        n = s["iterations"]
        pct = benchlib.fmt(100 * (sft.get("start_acc") or float("nan")), ".0f", "%")
        end = benchlib.fmt(100 * sft.get("acc", float("nan")), ".0f", "%")
        lines += [
            "## Iterations to a held-out mean reward (reverse 6-10 letters, tiny preset)", "",
            f"PPO starts from SFT step {sft.get('start_step')} of {s['sft_steps']} (held-out exact match "
            f"{pct}; at step {s['sft_steps']}: {end}). PPO: {n} iterations of 64 prompts, "
            f"optim.lr={s['lr']}, evaluated every 2.", "",
        ]  # fmt: skip
        rows = []
        for name in SPEED:
            runs = [s["runs"].get(f"{name}/seed{seed}", {}) for seed in s["seeds"]]
            ok = [r for r in runs if "error" not in r]
            row = [name]
            for target in TARGETS:
                hits = [first_at(r["curve"], target) for r in ok]
                shown = [str(h) if h is not None else f">{n}" for h in hits]
                shown += [r["error"] if r["error"] in ("not run", "did not finish") else "failed"
                          for r in runs if "error" in r]  # fmt: skip
                capped = [h if h is not None else n + 1 for h in hits]
                med = statistics.median(capped) if capped else float("nan")
                row += [" / ".join(shown), f"{med:g}" if med <= n else f">{n}"]
            first = [r["curve"][0][1] for r in ok if r.get("curve")]
            area = [statistics.mean(v for _, v in r["curve"]) for r in ok if r.get("curve")]
            row += [f"{statistics.mean(first):.3f}" if first else "-",
                    f"{statistics.mean(r['eval_reward'] for r in ok):.3f}" if ok else "-",
                    f"{statistics.mean(area):.3f}" if area else "-"]  # fmt: skip
            rows.append(row)
        headers = ["run"]
        for target in TARGETS:
            headers += [f"iterations to {target} (per seed)", "median"]
        headers += ["held-out reward, iteration 2", f"iteration {n}", "mean over evaluations"]
        lines += [benchlib.render_table(headers, rows), ""]
    m = report.get("memory")
    if m:
        rows = []
        base = m.get("adalomo", {}).get("peak_rss_mib")
        for name, r in m.items():
            if "error" in r:
                rows.append([name, "failed", r["error"]])
                continue
            rows.append(
                [name, f"{r['peak_rss_mib']:.0f} MiB", f"{r['peak_rss_mib'] / base:.2f}x" if base else "-"]
            )
        table = benchlib.render_table(["policy and critic optimizer", "peak RSS", "vs AdaLomo"], rows)
        title = "## Memory: peak RSS of 2 PPO iterations, 0.1b preset (fp32), 8 prompts x 16 tokens"
        lines += [title, "", table, ""]
    lines += [report.get("notes", ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--only", default="speed,memory")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sft-steps", type=int, default=1600, help="SFT schedule; PPO starts from its middle")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--work", type=Path, default=Path("/tmp/leantune-rl"))
    p.add_argument("--out", type=Path, default=RESULTS / "rl")
    p.add_argument("--collect", action="store_true", help="report the speed runs an earlier call finished")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    only = benchlib.parse_only(args.only, ["speed", "memory"])
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    import shutil

    for old in (args.work / "runs").glob("*"):  # this call's runs only: an earlier call's would be refused
        if ("speed" in only and not args.collect and not old.name.startswith("mem-")) or (
            "memory" in only and old.name.startswith("mem-")
        ):
            shutil.rmtree(old)
    files = make_data(args.work)
    report: dict = {"source": benchlib.source(), "machine": benchlib.machine()}
    if "speed" in only:
        found = collect(args) if args.collect else speed(args, files)
        report["speed"] = {**found, "sft_steps": args.sft_steps, "iterations": args.iterations,
                           "seeds": args.seeds, "lr": args.lr}  # fmt: skip
    if "memory" in only:
        report["memory"] = memory(args, files)
    report["notes"] = NOTES
    benchlib.write_report(args.out, report, render(report))
    print(render(report))
    return 0


NOTES = """Notes. Neither target is reached by any configuration in 40 iterations (2,560 rollouts): the held-
out mean reward moves from about 0.70 to 0.73-0.74, for token-level PPO, MA-RLHF at n = 3 and n = 5
and the lambda = 1 control alike (the mean over the evaluations differs by 0.002, well inside the
seed-to-seed spread), so MA-RLHF's 1.7-2x speed-up is not reproduced at this scale; nor is its
opposite. For comparison, the 800 further SFT steps of the same schedule take the held-out exact
match from 54% to 82%. The settings come from a short sweep from the step-800 checkpoint of an
identical SFT run (24 iterations, one seed, held-out reward first -> last): AdaLomo lr 3e-3 with 2
epochs 0.70 -> 0.70; AdamW lr 1e-4 0.66 -> 0.65; AdaLomo lr 1e-3, 4 epochs, no advantage clip 0.71
-> 0.73 (the setting used); AdaLomo lr 1e-3, 2 epochs, temperature 0.7 0.72 -> 0.73; and from the
step-600 checkpoint (30% solved, reward 0.50) AdaLomo lr 5e-3 fell to 0.45 (the KL to the reference
grew to 4.7 nats) and lr 2e-3 with 4 epochs stayed at 0.51. The mechanics were checked separately:
an update raises the log-probs of the positive-advantage completions (correlation 0.90 between the
change of log-prob and the advantage), and on a dense reward (the share of odd code points) the
rollout reward rose 0.55 -> 0.63 in 20 iterations. Memory is the whole-process peak RSS (VmHWM):
three models (policy, reference, critic) plus the optimizer states; AdamW's are two fp32 moments of
policy and critic. The runs shared the 2 cores with other work, which changes their times, not their
results."""

if __name__ == "__main__":
    sys.exit(main())
