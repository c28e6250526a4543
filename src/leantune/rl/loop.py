"""The PPO loop (``train.objective=ppo``): rollout -> score -> credit assignment -> PPO epochs.

One iteration (``train.max_steps`` of them):

1. ``train.batch_size`` prompts; one completion each, sampled by the policy (``rl.temperature``,
   ``rl.top_p``, at most ``rl.max_new_tokens``), seeded by the torch RNG the checkpoints hold;
2. no-grad passes: the policy's log-probs, the frozen reference's (``rl.reference=offload``: its
   weights live in host memory and visit the device for this pass only), the critic's values,
   and the sequence reward (:mod:`leantune.rl.rewards`);
3. the score normalised over running moments and clipped, the token-level KL penalty, GAE per token
   or over MA-RLHF macro actions, advantages whitened and clipped (:mod:`leantune.rl.advantages`);
4. ``rl.ppo_epochs`` passes over the rollout in minibatches: the clipped policy loss (plus entropy
   bonus, PPO-ptx and, with ``rl.critic=shared``, the value loss) through the policy's optimizer;
   the clipped value loss through the critic's. Fused optimizers (AdaLomo, LOMO) update inside
   these backward passes: no gradient and, for LOMO, no optimizer state is ever whole.

What is resident: the policy and its optimizer state, the critic and its state (none for
``shared``), the reference's weights (``resident``) and a reward model's (host memory with
``offload``); per rollout, its token tensors and the ``[B, T]`` log-probs, values and advantages.

Checkpoints (``train.save_every``) hold the policy, the critic (or value head), both optimizers,
the schedules, the running moments, the prompt position and the random states: a resumed run
continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from leantune import checkpoint as ckpt
from leantune.config import Config, ConfigError, render_config
from leantune.data import build_datasets, load_tokenizer
from leantune.distributed.runtime import init_distributed
from leantune.monitor import Monitor, peak_memory_bytes
from leantune.rl import advantages as adv
from leantune.rl.losses import policy_loss, value_loss
from leantune.rl.rewards import RewardError, load_reward
from leantune.rl.rollout import Prompt, PromptStream, Rollout, forward_policy, forward_values, generate
from leantune.rl.values import PolicyWithValueHead, build_critic
from leantune.training import build
from leantune.training.guards import NonfiniteGuard, StepResult, StopRequest, nonfinite_weights
from leantune.training.run_dir import CommandLine, check_resume_config, resolve_run_dir, resume_hint

__all__ = ["PPOHook", "PPOTrainer", "RLError"]

_VALUE_HEAD = "value_head.safetensors"


class RLError(RuntimeError):
    """The PPO run cannot continue (the message says why and how to resume)."""


class PPOHook:
    """Called around every PPO iteration (tests stop or measure a run this way)."""

    def on_iteration_end(self, trainer: PPOTrainer, step: int, metrics: dict[str, float]) -> None:
        """After iteration ``step`` (1-based) was applied and logged."""


class PPOTrainer:
    """PPO on a causal LM as ``cfg`` describes (``train.objective=ppo``, the ``rl:`` section).

    Example:
        >>> from leantune.config import load_config
        >>> cfg = load_config(None, ["train.objective=ppo", "model.path=runs/sft/final"])
        >>> summary = PPOTrainer(cfg).run()
    """

    def __init__(
        self, cfg: Config, *, hooks: Sequence[PPOHook] = (), origin: CommandLine | None = None
    ) -> None:
        self.cfg, self.hooks, self.origin = cfg, list(hooks), origin
        self.step = 0
        self.tokens_seen = 0
        self.last_eval: dict[str, Any] = {}
        self.stop = StopRequest()
        self.run_dir: Path | None = None
        self.allocator_note: str | None = None
        self.is_main = True

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop after the current iteration: save a checkpoint and return."""
        self.stop.request(signum)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, r = self.cfg, self.cfg.rl
        self.env = init_distributed("none", cfg.train.device)
        self.device = self.env.device
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        build.check_paths(cfg)
        self.tokenizer = load_tokenizer(
            cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
        )
        self.prompts, self.eval_prompts, self.data = self._prompts()
        self.policy, _ = build.build_model(cfg, self.tokenizer, self.device)
        self.policy.generation_config.use_cache = True  # build_model turns the training cache off
        offload = r.reference == "offload"
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        if offload:
            self.reference.to("cpu")
        self.reward = load_reward(r.reward, self.device, offload=offload, dtype=self.policy.dtype)
        reward_dir = getattr(self.reward, "spec", None) if not hasattr(self.reward, "fn") else None
        critic, self.critic_note = build_critic(
            r.critic, self.policy, self.tokenizer, reward_dir=reward_dir, seed=cfg.train.seed,
            vocab_size=len(self.tokenizer),
        )  # fmt: skip
        if critic is None:
            self.actor: torch.nn.Module = PolicyWithValueHead(self.policy)
            self.critic = None
        else:
            self.actor = self.policy
            self.critic = critic.to(self.device).train()
            if cfg.model.gradient_checkpointing:
                critic.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        minibatch = r.minibatch_size or cfg.train.batch_size
        self.updates_per_iteration = r.ppo_epochs * math.ceil(cfg.train.batch_size / minibatch)
        self.total_steps = cfg.train.max_steps
        total_updates = max(1, self.total_steps * self.updates_per_iteration)
        self.optimizer, self.stepper = build.build_optimizer(cfg, self.actor)
        self.scheduler = build.build_scheduler(self.optimizer, cfg, total_updates)
        self.critic_optimizer = self.critic_stepper = self.critic_scheduler = None
        if self.critic is not None:
            critic_cfg = dataclasses.replace(
                cfg, optim=dataclasses.replace(cfg.optim, lr=r.critic_lr or cfg.optim.lr)
            )
            self.critic_optimizer, self.critic_stepper = build.build_optimizer(critic_cfg, self.critic)
            self.critic_scheduler = build.build_scheduler(self.critic_optimizer, critic_cfg, total_updates)
        self.ptx_stream = None
        if r.ptx_coef > 0:
            from leantune.loss import training_loss

            self.ptx_stream = build.build_stream(cfg, self.data, self.tokenizer, 0, 1)
            self.ptx_loss, _ = training_loss(self.policy, cfg.train.loss_chunk)
        self.stream = PromptStream(self.prompts, cfg.train.batch_size, cfg.train.seed)
        self.moments = adv.RunningMoments()
        self.macro_rng = random.Random(cfg.train.seed)
        self.run_dir, resume_from = resolve_run_dir(cfg)
        self.guard = NonfiniteGuard(
            cfg.train.max_nonfinite, cfg.optim.lr, say=lambda text: self.monitor.print(text),
            bad_weights=lambda: nonfinite_weights(self.actor, self.device), hint=self._resume_hint,
        )  # fmt: skip
        if resume_from is not None:
            self._load(resume_from)
        self.resumed_from = resume_from
        self.monitor = Monitor(
            self.run_dir, self.total_steps, progress=cfg.log.progress, tensorboard=cfg.log.tensorboard,
            start_step=self.step, device=self.device,
        )  # fmt: skip
        ckpt.write_text_atomic(self.run_dir / "config.yaml", render_config(cfg, comments=False))
        self._announce(resume_from)

    def _prompts(self) -> tuple[list[Prompt], list[Prompt], Any]:
        cfg = self.cfg
        data_cfg = dataclasses.replace(cfg.data, pack=False)  # prompts, one per sample
        data = build_datasets(data_cfg, self.tokenizer)

        def prompts(samples: list[Any]) -> list[Prompt]:
            return [
                Prompt(
                    list(s.prompt_ids),
                    self.tokenizer.decode(s.prompt_ids, skip_special_tokens=True),
                    s.answer,
                )
                for s in samples
                if s.prompt_ids is not None
            ]

        train, evals = prompts(data.train), prompts(data.eval)
        if not train:
            raise ConfigError(
                f"train.objective=ppo samples completions of prompts: data.train ({cfg.data.train}) has "
                f"{data.format} records without a prompt; give instruction, alpaca, sharegpt or "
                "OpenAI-chat records (the completion is the model's, the recorded one is ignored "
                "unless the reward takes answers=)"
            )
        return train, evals, data

    def _announce(self, resume_from: Path | None) -> None:
        from leantune.models import count_parameters, human_count

        m, cfg, r = self.monitor, self.cfg, self.cfg.rl
        m.print("leantune: resolved config", style="bold")
        m.print(render_config(cfg, comments=False).rstrip())
        critic = (
            f"{human_count(count_parameters(self.critic))} parameters" if self.critic is not None else "-"
        )
        macro = "token-level" if r.macro_action == "none" else (
            f"macro actions: {r.macro_action}" + (f" n={r.ngram}" if r.macro_action == "ngram" else "")
            + f", {r.macro_value} pooling"
        )  # fmt: skip
        m.print(
            f"ppo: policy {human_count(count_parameters(self.policy))} parameters ({cfg.optim.name}), "
            f"critic: {self.critic_note} ({critic}), reference: {r.reference}, reward: "
            f"{self.reward.description}"
        )
        m.print(
            f"ppo: {len(self.prompts)} prompts ({len(self.eval_prompts)} held out), {cfg.train.batch_size} "
            f"per rollout, {self.updates_per_iteration} updates per iteration, {macro}, "
            f"gamma {r.gamma} lambda {r.lam}, kl {r.kl_coef}"
        )
        if self.allocator_note:
            m.print(f"memory: {self.allocator_note}")
        m.print(f"run directory: {self.run_dir}")
        if resume_from is not None:
            m.print(f"resumed from {resume_from} at iteration {self.step}")

    def _resume_hint(self) -> str:
        return resume_hint(self.cfg, self.run_dir, self.origin)

    # -------------------------------------------------------------- rollout
    def _reference_logp(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        offload = self.cfg.rl.reference == "offload" and self.device.type != "cpu"
        if offload:
            self.reference.to(self.device)
        try:
            logp, _, _ = forward_policy(self.reference, batch, self.cfg.rl.temperature)
        finally:
            if offload:
                self.reference.to("cpu")
        return logp

    def _score(self, ro: Rollout) -> list[float]:
        prompts = [p.text for p in ro.prompts]
        answers = [p.answer for p in ro.prompts]
        return self.reward(prompts, ro.completions, answers, sequences=ro.sequences)

    @torch.no_grad()
    def rollout(self) -> tuple[Rollout, dict[str, float]]:
        """Sample one rollout and compute its rewards, advantages and returns."""
        r = self.cfg.rl
        ro = generate(
            self.policy, self.tokenizer, self.stream.next_batch(), device=self.device,
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
        )  # fmt: skip
        batch = {
            "tokens": ro.tokens,
            "attention_mask": ro.attention_mask,
            "index": ro.index,
            "response": ro.response,
        }
        self.actor.eval()
        try:
            logp, entropy, values = forward_policy(self.actor, batch, r.temperature, entropy=True)
            if self.critic is not None:
                self.critic.eval()
                values = forward_values(self.critic, batch)
                self.critic.train()
        finally:
            self.actor.train()
        ref_logp = self._reference_logp(batch)
        raw = torch.tensor(self._score(ro), dtype=torch.float32, device=self.device)
        score = self._normalise(raw)
        mask = ro.mask
        rewards = adv.token_rewards(logp, ref_logp, score, mask, r.kl_coef)
        values = values * mask
        lengths = mask.long().sum(1).tolist()
        if r.macro_action == "none":
            advantages, returns = adv.token_advantages(rewards, values, mask, r.gamma, r.lam)
            n_macro = sum(lengths)
        else:
            starts = [self._boundaries(length, ref_logp[b, :length]) for b, length in enumerate(lengths)]
            advantages, returns = adv.macro_advantages(
                rewards, values, mask, starts, r.gamma, r.lam, r.macro_value
            )
            n_macro = sum(len(s) for s in starts)
        if r.whiten_advantages:
            advantages = adv.masked_whiten(advantages, mask)
        if r.advantage_clip is not None:
            advantages = advantages.clamp(-r.advantage_clip, r.advantage_clip) * mask
        ro.logp, ro.ref_logp, ro.values, ro.scores = logp, ref_logp, values, raw
        ro.rewards, ro.advantages, ro.returns = rewards, advantages, returns
        kl = ((logp - ref_logp) * mask).sum(1)
        n_tokens = int(mask.sum())
        stats = {
            "reward": float(raw.mean()),
            "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "kl": float(kl.mean()),
            "entropy": float(adv.masked_mean(entropy, mask)),
            "response_len": n_tokens / len(lengths),
            "truncated": float(ro.truncated.float().mean()),
            "macro_len": n_tokens / max(n_macro, 1),
            "value_mean": float(adv.masked_mean(values, mask)),
            "return_mean": float(adv.masked_mean(returns, mask)),
        }
        self.rollout_tokens = int(ro.attention_mask.sum())
        return ro, stats

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        r = self.cfg.rl
        score = raw
        if r.reward_norm != "none":
            self.moments.update(raw)
            std = max(self.moments.std, 1e-8)
            score = (raw - self.moments.mean) / std if r.reward_norm == "norm" else raw / std
        if r.reward_clip is not None:
            score = score.clamp(-r.reward_clip, r.reward_clip)
        return score

    def _boundaries(self, length: int, ref_logp: torch.Tensor) -> list[int]:
        r = self.cfg.rl
        ppl = (-ref_logp).exp().tolist() if r.macro_action == "ppl" else None
        return adv.macro_boundaries(
            length, r.macro_action, n=r.ngram, repeat=r.macro_repeat, rng=self.macro_rng, ppl=ppl
        )

    # -------------------------------------------------------------- update
    def _update(self, ro: Rollout) -> tuple[dict[str, float], bool]:
        """``rl.ppo_epochs`` passes over ``ro`` in minibatches; returns the mean losses and
        whether an update was skipped (a non-finite loss or gradient)."""
        r = self.cfg.rl
        n = len(ro.prompts)
        size = r.minibatch_size or n
        sums: dict[str, float] = {}
        count, skipped = 0, False
        for _ in range(r.ppo_epochs):
            order = torch.randperm(n).to(self.device)
            for start in range(0, n, size):
                mb = ro.rows(order[start : start + size])
                logp, entropy, values = forward_policy(
                    self.actor, mb, r.temperature, entropy=r.entropy_coef > 0
                )
                pg, metrics = policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], r.clip_ratio)
                loss = pg
                if entropy is not None:
                    loss = loss - r.entropy_coef * adv.masked_mean(entropy, mb["mask"])
                if self.ptx_stream is not None:
                    sft = {k: v.to(self.device) for k, v in self.ptx_stream.next_batch().items()}
                    ptx = self.ptx_loss(self.policy, sft)
                    loss = loss + r.ptx_coef * ptx
                    metrics["ptx_loss"] = ptx.detach()
                if self.critic is not None:
                    values = forward_values(self.critic, mb)
                vl, vmetrics = value_loss(values, mb["values"], mb["returns"], mb["mask"], r.value_clip)
                metrics.update(vmetrics)
                if self.critic is None:
                    loss = loss + r.vf_coef * vl
                skipped |= self._backward(self.stepper, loss)
                if self.critic_stepper is not None:
                    skipped |= self._backward(self.critic_stepper, r.vf_coef * vl)
                    self.critic_scheduler.step()
                self.scheduler.step()
                metrics.update(pg_loss=pg.detach(), value_loss=vl.detach())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        return {k: v / count for k, v in sums.items()}, skipped

    @staticmethod
    def _backward(stepper: Any, loss: torch.Tensor) -> bool:
        if not torch.isfinite(loss.detach()):
            stepper.zero_grad()
            return True
        result = stepper.backward(loss)
        return bool(result.skipped or getattr(result, "zeroed", False))

    def iteration(self) -> dict[str, float]:
        """One PPO iteration: rollout, scoring, credit assignment, updates. Returns its metrics."""
        start = time.perf_counter()
        ro, stats = self.rollout()
        rollout_s = time.perf_counter() - start
        losses, skipped = self._update(ro)
        elapsed = time.perf_counter() - start
        timing = {"rollout_seconds": rollout_s, "iteration_seconds": elapsed,
                  "tokens_per_s": self.rollout_tokens / max(elapsed, 1e-9)}  # fmt: skip
        return {**stats, **losses, "skipped": float(skipped), **timing}

    # ------------------------------------------------------------ evaluate
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean reward of greedy completions of the held-out prompts (at most
        ``eval.accuracy_samples``; 0 = all) and the share scored 1 or more."""
        prompts = self.eval_prompts
        limit = self.cfg.eval.accuracy_samples
        if limit:
            prompts = prompts[:limit]
        if not prompts:
            return {}
        state = torch.get_rng_state()  # evaluation never moves the rollouts' random stream
        scores: list[float] = []
        lengths: list[int] = []
        for start in range(0, len(prompts), 64):
            chunk = prompts[start : start + 64]
            ro = generate(
                self.policy, self.tokenizer, chunk, device=self.device,
                max_new_tokens=self.cfg.rl.max_new_tokens, temperature=1.0, top_p=1.0, greedy=True,
            )  # fmt: skip
            scores += self._score(ro)
            lengths += ro.mask.long().sum(1).tolist()
        torch.set_rng_state(state)
        values = {
            "eval_reward": sum(scores) / len(scores),
            "eval_solved": sum(s >= 1.0 for s in scores) / len(scores),
            "eval_response_len": sum(lengths) / len(lengths),
            "eval_prompts": len(scores),
        }
        self.last_eval = values
        return values

    # --------------------------------------------------------------- train
    def train(self) -> Any:
        from leantune.trainer import RunSummary, TrainingError

        cfg = self.cfg
        started, run_start = time.perf_counter(), self.step
        paused = 0.0
        with self.stop:
            while self.step < self.total_steps:
                try:
                    metrics = self.iteration()
                except RewardError as err:
                    raise RLError(self._reward_failed(err)) from err
                self.step += 1
                self.tokens_seen += self.rollout_tokens
                result = StepResult(metrics["pg_loss"], self.rollout_tokens, skipped=bool(metrics["skipped"]))
                self.guard.observe(self.step, result)
                record = {
                    "loss": metrics["pg_loss"], "lr": float(self.optimizer.param_groups[0]["lr"]),
                    "peak_mem_bytes": peak_memory_bytes(self.device), "epoch": self.stream.epoch_progress,
                    "skipped_steps": self.guard.total, **metrics,
                }  # fmt: skip
                if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                    self.monitor.log_train(self.step, record)
                else:
                    self.monitor.record("train", self.step, record)
                    self.monitor.advance(self.step)
                for hook in self.hooks:
                    hook.on_iteration_end(self, self.step, metrics)
                t0 = time.perf_counter()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                    self.monitor.log_eval(self.step, self.evaluate())
                every = cfg.train.save_every
                if every and self.step % every == 0 and self.step < self.total_steps:
                    self.save()
                paused += time.perf_counter() - t0
                if self.stop.requested(self.device):
                    path = self.save()
                    self.monitor.print(
                        f"\n{self.stop.name} received: saved {path} at iteration {self.step}. Resume with:\n"
                        f"  leantune train {self._resume_hint()}"
                    )
                    return RunSummary(self.run_dir, self.step, None, {}, interrupted=True)
        train_time = time.perf_counter() - started - paused
        metrics = self.evaluate()
        if metrics:
            self.monitor.log_eval(self.step, metrics)
        metrics.update(peak_mem_bytes=peak_memory_bytes(self.device), train_seconds=train_time,
                       steps_this_run=self.step - run_start)  # fmt: skip
        self.monitor.record("summary", self.step, metrics)
        self.save()
        try:
            final = ckpt.atomic_directory(
                self.run_dir / "final", lambda tmp: ckpt.save_model(self.policy, self.tokenizer, tmp),
                meta={"step": self.step},
            )  # fmt: skip
        except ckpt.CheckpointWriteError as err:
            raise TrainingError(f"{err}. Resume with:\n  leantune train {self._resume_hint()}") from err
        return RunSummary(self.run_dir, self.step, final, metrics)

    def _reward_failed(self, err: RewardError) -> str:
        found = ckpt.latest_valid_checkpoint(self.run_dir / "checkpoints")
        kept = (
            f"The last checkpoint, {found}, is intact."
            if found is not None
            else "There is no checkpoint yet (train.save_every)."
        )
        return (
            f"iteration {self.step + 1}: {err}. {kept} Fix the reward, then resume with:\n"
            f"  leantune train {self._resume_hint()}"
        )

    # ---------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "stream": self.stream.state_dict(),
            "ptx_stream": self.ptx_stream.state_dict() if self.ptx_stream is not None else None,
            "moments": self.moments.state_dict(),
            "macro_rng": self.macro_rng.getstate(),
            "rng": ckpt.capture_rng(),
            "scheduler": self.scheduler.state_dict(),
            "critic_scheduler": self.critic_scheduler.state_dict() if self.critic_scheduler else None,
            "engine": self.stepper.engine_state_dict(),
            "critic_engine": self.critic_stepper.engine_state_dict() if self.critic_stepper else None,
            **self.guard.state_dict(),
        }

    def save(self) -> Path:
        """Write a resumable checkpoint of the current iteration and prune old ones."""
        from safetensors.torch import save_file

        from leantune.trainer import TrainingError

        bad = nonfinite_weights(self.actor, self.device)
        if bad:
            raise TrainingError(f"refusing to write the checkpoint of iteration {self.step}: the weights "
                                f"hold inf/nan ({bad[:3]}); earlier checkpoints are intact")  # fmt: skip
        state = self._state()

        def write(tmp: Path) -> None:
            ckpt.save_model(self.policy, self.tokenizer, tmp / "model")
            if self.critic is None:
                head = self.actor.v_head.state_dict()
                save_file({k: v.detach().cpu().contiguous() for k, v in head.items()},
                          str(tmp / _VALUE_HEAD))  # fmt: skip
            else:
                self.critic.model.save_pretrained(tmp / "critic", safe_serialization=True)
                ckpt.save_optimizer(self.critic, self.critic_optimizer, tmp / "critic_optim")
            ckpt.save_optimizer(self.actor, self.optimizer, tmp / "optim")
            ckpt.save_torch(state, tmp / "training_state.pt")
            (tmp / "trainer_state.json").write_text(
                yaml.safe_dump({"step": self.step, "tokens_seen": self.tokens_seen, "eval": self.last_eval})
            )

        root = self.run_dir / "checkpoints"
        try:
            path = ckpt.atomic_directory(
                root / f"{ckpt.PREFIX}{self.step:06d}", write, meta={"step": self.step}
            )
        except ckpt.CheckpointWriteError as err:
            raise TrainingError(f"{err}. Resume from the last intact checkpoint with:\n"
                                f"  leantune train {self._resume_hint()}") from err  # fmt: skip
        ckpt.prune_checkpoints(root, self.cfg.train.keep_last)
        return path

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file

        from leantune.optim import resume_refusal

        check_resume_config(self.cfg, self.run_dir)
        refusal = resume_refusal(self.cfg.optim.name)
        if refusal is not None:
            raise ConfigError(f"cannot resume {path} with optim.name={self.cfg.optim.name}: {refusal}")
        ckpt.load_model_weights(self.policy, path / "model")
        if self.critic is None:
            self.actor.v_head.load_state_dict(load_file(str(path / _VALUE_HEAD)))
        else:
            ckpt.load_model_weights(self.critic.model, path / "critic")
            ckpt.load_optimizer(self.critic, self.critic_optimizer, path / "critic_optim")
        ckpt.load_optimizer(self.actor, self.optimizer, path / "optim")
        s = ckpt.load_torch(path / "training_state.pt")
        self.step, self.tokens_seen = int(s["step"]), int(s["tokens_seen"])
        self.stream.load_state_dict(s["stream"])
        if self.ptx_stream is not None and s["ptx_stream"] is not None:
            self.ptx_stream.load_state_dict(s["ptx_stream"])
        self.moments.load_state_dict(s["moments"])
        self.macro_rng.setstate(_as_random_state(s["macro_rng"]))
        self.scheduler.load_state_dict(s["scheduler"])
        self.stepper.load_engine_state_dict(s["engine"])
        if self.critic is not None:
            self.critic_scheduler.load_state_dict(s["critic_scheduler"])
            self.critic_stepper.load_engine_state_dict(s["critic_engine"])
        self.guard.load_state_dict(s)
        ckpt.restore_rng(s["rng"])

    # ----------------------------------------------------------------- run
    def close(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()

    def print_summary(self, summary: Any) -> None:
        from leantune.monitor import format_bytes

        m = summary.metrics
        parts = [f"{summary.steps} iterations"]
        if "eval_reward" in m:
            parts.append(f"held-out reward {m['eval_reward']:.3f} (solved {m['eval_solved']:.1%})")
        parts.append(f"peak memory {format_bytes(m['peak_mem_bytes'])}")
        self.monitor.print("done: " + ", ".join(parts))
        self.monitor.print(
            f"final policy: {summary.final_dir}  (try: leantune generate {summary.run_dir} ...)"
        )

    def run(self) -> Any:
        """setup -> train -> plot -> close, printing a summary."""
        try:
            self.setup()
            summary = self.train()
            if self.cfg.log.plot and not summary.interrupted:
                from leantune.plot import plot_run

                plot_run(self.run_dir)
            if not summary.interrupted:
                self.print_summary(summary)
            return summary
        finally:
            self.close()


def _as_random_state(state: Any) -> tuple:
    # torch.load(weights_only) gives the tuple of random.getstate() back as nested lists
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
