"""Reinforcement learning from a reward: PPO with PPO-max's switches and MA-RLHF's macro actions.

``train.objective=ppo`` runs :class:`leantune.rl.loop.PPOTrainer` instead of the supervised loop;
it composes the same builders, checkpoint primitives, monitor and optimizers (fused ones
included). The math is in :mod:`leantune.rl.advantages` and :mod:`leantune.rl.losses`.
"""
