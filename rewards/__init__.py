"""Reward plugins: async callables that score one sample.

This package imports nothing from trainer/, rollout/ or glm5_model/, so a plugin can be written and tested
without engines or Megatron.
"""
from rewards.api import RewardInput, RewardResult, RewardFn
from rewards.registry import (get_reward, load_reward, register_reward, registered_rewards, reward_examples,
                              reward_batch_metrics)
from rewards.runner import RewardRunner, RewardSpec, RunnerSettings

__all__ = [
    "RewardInput", "RewardResult", "RewardFn",
    "get_reward", "register_reward", "registered_rewards", "load_reward", "reward_examples", "reward_batch_metrics",
    "RewardRunner", "RewardSpec", "RunnerSettings",
]
