"""``leantune train [CONFIG.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

HELP = """\
Train a model. With no arguments: the built-in default job (a small LLaMA trained from scratch
with AdaLomo on generated instruction tasks, ~2 minutes on 2 CPU cores).

Settings come from an optional YAML file, then `section.key=value` overrides, e.g.
  leantune train optim.name=adamw optim.lr=3e-4 train.max_steps=1000
  leantune train my.yaml model.path=./llama data.train=data.jsonl model.dtype=bf16
  leantune train train.resume=auto train.run_name=my-run      # continue after a crash
  leantune train dist.nproc=2 dist.strategy=fsdp               # starts torchrun for you
  leantune train dist.nproc=4 dist.tp=2 dist.strategy=ddp      # tensor parallel x 2, data parallel x 2
  leantune train model.preset=test dist.nproc=2 dist.pp=2      # 2 pipeline stages (LLaMA, untied head)
  leantune train optim.name=galore optim.kwargs='{rank: 128}' optim.lr=1e-2   # GaLore, APOLLO,
      # Adam-mini, BAdam, torchao's 8/4-bit AdamW: pip install 'leantune[competitors]'
  leantune train model.path=runs/sft/final train.objective=dpo data.train=pairs.jsonl optim.lr=1e-3
      # DPO (or ipo, simpo, orpo) on prompt/chosen/rejected records; the reference's log-probs
      # are precomputed into the run directory (dpo.reference=live|adapter otherwise)
  leantune train model.path=runs/sft/final train.objective=ppo rl.reward=my_reward.py:score
      # PPO with PPO-max's switches (rl.*); rl.macro_action=ngram rl.ngram=3 for MA-RLHF;
      # train.max_steps counts PPO iterations; rl.reward may also be a reward model directory
  leantune train ... train.loss_chunk=1024     # tokens per chunk of the loss (0 = full logits)
  leantune train ... serve.port=8000    # chat with the model while it trains: http://127.0.0.1:8000/
  leantune train ... train.fix_mmap_threshold=false   # glibc's allocator as is: faster on CPU,
                                                      # more RSS than `leantune estimate` says
`leantune config` lists every key with its documentation.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (default: the built-in job)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional YAML config followed by overrides",
    )
    p.set_defaults(func=run)


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The YAML path (first item without '=') and the overrides."""
    path = None
    overrides = []
    for i, item in enumerate(items):
        if "=" not in item and i == 0 and path is None:
            path = item
        else:
            overrides.append(item)
    return path, overrides


def run(args: argparse.Namespace) -> int:
    code = _train(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from leantune.distributed.runtime import exit_worker

        exit_worker(code)
    return code


def _train(args: argparse.Namespace) -> int:
    from leantune.config import ConfigError, load_config
    from leantune.data import DataError

    path, overrides = split_items(args.items)
    try:
        cfg = load_config(path, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"leantune train: {err}", file=sys.stderr)
        return 2
    from leantune.distributed.launch import maybe_launch

    if cfg.serve.port is not None and int(os.environ.get("RANK", "0")) == 0:
        from leantune.serve.live import check_port

        try:  # a port in use is an error now, before any worker starts or the model is built
            check_port(cfg.serve.host, cfg.serve.port)
        except ConfigError as err:
            print(f"leantune train: {err}", file=sys.stderr)
            return 2
    launched = maybe_launch(cfg, sys.argv)
    if launched is not None:
        return launched
    from leantune.checkpoint import CheckpointError
    from leantune.rl.loop import PPOTrainer, RLError
    from leantune.rl.rewards import RewardError
    from leantune.rss import fix_mmap_threshold
    from leantune.trainer import Trainer, TrainingError
    from leantune.training.run_dir import CommandLine, resume_hint

    # Before the model exists: what RSS shows is then the live tensors, what `leantune estimate`
    # predicts (glibc's adaptive threshold would keep freed tensors in its heap).
    allocator = (
        fix_mmap_threshold()
        if cfg.train.fix_mmap_threshold
        else "glibc defaults (train.fix_mmap_threshold=false)"
    )
    origin = CommandLine(path, list(overrides))  # repeated in the "resume with" hints
    hooks: list[Any] = []
    if cfg.serve.port is not None:  # chat with the model while it trains (leantune.serve.live)
        from leantune.serve.live import LiveServer

        try:
            hooks.append(LiveServer(cfg.serve))
        except ConfigError as err:
            print(f"leantune train: {err}", file=sys.stderr)
            return 2
    if cfg.train.objective == "ppo":
        trainer: Any = PPOTrainer(cfg, origin=origin)  # serve.port is refused for ppo (Config.validate)
    else:
        trainer = Trainer(cfg, origin=origin, hooks=hooks)
    trainer.allocator_note = allocator
    try:
        summary = trainer.run()
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, RewardError) as err:
        print(f"leantune train: {err}", file=sys.stderr)
        return 2
    except (TrainingError, RLError) as err:
        print(f"leantune train: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM: stopped at once, even during a save
        if trainer.run_dir is None:
            raise
        print(
            "leantune train: interrupted (a checkpoint being written is discarded). Resume from the "
            f"last complete one with:\n  leantune train {resume_hint(cfg, trainer.run_dir, origin)}",
            file=sys.stderr,
        )
        return 130
    finally:
        for hook in hooks:
            hook.close()  # the socket, also when setup failed before the server started
    return 130 if summary.interrupted else 0
