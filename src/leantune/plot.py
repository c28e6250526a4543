"""``leantune plot RUN_DIR``: one PNG with the loss, evaluation, learning-rate and throughput curves."""

from __future__ import annotations

from pathlib import Path

from leantune.monitor import read_metrics

__all__ = ["plot_run"]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``RUN_DIR/metrics.jsonl`` into ``out`` (default ``RUN_DIR/plot.png``) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training or evaluation records yet")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if any("value_loss" in r for r in train):  # PPO: the critic's loss beside the policy's
        ax.plot([r["step"] for r in train], [r["value_loss"] for r in train], label="value loss", lw=1)
    with_loss = [r for r in evals if "eval_loss" in r]
    if with_loss:
        ax.plot([r["step"] for r in with_loss], [r["eval_loss"] for r in with_loss], "o-", label="eval loss")
    ax.set_title("policy and value loss" if any("reward" in r for r in train) else "loss")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    if any("reward" in r for r in train):
        _plot_ppo(ax, train, evals)
    elif any("rewards/accuracy" in r for r in train):
        _plot_preference(ax, train, evals)
    else:
        _plot_accuracy(ax, evals)
    ax = axes[1][0]
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_title("learning rate")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax = axes[1][1]
    if train:
        ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax.set_title("tokens / s")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "plot.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_accuracy(ax, evals: list[dict]) -> None:
    """Exact-match accuracy per task, or the perplexity where there is none."""
    acc_keys = sorted({k for r in evals for k in r if k.startswith("acc/")})
    for key in acc_keys:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=key[4:])
    ppl = [r for r in evals if "eval_ppl" in r]
    if not acc_keys and ppl:
        ax.plot([r["step"] for r in ppl], [r["eval_ppl"] for r in ppl], "o-", label="perplexity")
    ax.set_title("exact-match accuracy (%)" if acc_keys else "eval perplexity")
    ax.set_xlabel("step")
    if acc_keys or ppl:
        ax.legend()
    ax.grid(alpha=0.3)


def _plot_preference(ax, train: list[dict], evals: list[dict]) -> None:
    """A preference run: the implicit-reward accuracy (left axis) and margin (right axis)."""
    rows = [r for r in train if "rewards/accuracy" in r]
    ax.plot(
        [r["step"] for r in rows], [100 * r["rewards/accuracy"] for r in rows], lw=1, label="train accuracy"
    )
    ev = [r for r in evals if "eval_reward_accuracy" in r]
    if ev:
        ax.plot(
            [r["step"] for r in ev],
            [100 * r["eval_reward_accuracy"] for r in ev],
            "o-",
            label="eval accuracy",
        )
    ax.set_ylabel("implicit-reward accuracy (%)")
    ax.set_title("preference: reward accuracy and margin")
    ax.set_xlabel("step")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot([r["step"] for r in rows], [r["rewards/margins"] for r in rows], color="gray", lw=1, ls="--")
    twin.set_ylabel("train reward margin (dashed)")


def _plot_ppo(ax, train: list[dict], evals: list[dict]) -> None:
    """A PPO run: the rollouts' and the held-out mean reward (left axis), the KL to the reference
    (right axis)."""
    rows = [r for r in train if "reward" in r]
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], lw=1, label="rollout reward")
    ev = [r for r in evals if "eval_reward" in r]
    if ev:
        steps, values = [r["step"] for r in ev], [r["eval_reward"] for r in ev]
        ax.plot(steps, values, "o-", label="held-out reward (greedy)")
    ax.set_ylabel("mean reward")
    ax.set_title("ppo: reward and KL to the reference")
    ax.set_xlabel("iteration")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot([r["step"] for r in rows], [r["kl"] for r in rows], color="gray", lw=1, ls="--")
    twin.set_ylabel("KL per sequence (dashed)")
