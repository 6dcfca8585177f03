"""RL advantages and policy losses as plain tensor functions (no Megatron, no Ray), so they test in isolation."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(R - mean_group) / (std_group + eps) for rewards laid out group after group: [num_groups * group_size]."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size).float()
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    return ((grouped - mean) / (std + eps)).view(-1)


@dataclass
class PolicyLossTerms:
    loss_sum: torch.Tensor       # sum over unmasked tokens of the per-token loss (has grad)
    clipped_tokens: torch.Tensor
    approx_kl_sum: torch.Tensor  # sum of (old - new) log-ratio, k1 estimator of KL(old || new)


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, eps_low: float, eps_high: float) -> PolicyLossTerms:
    """Token-level PPO clip with asymmetric bounds (clip-higher): -min(r A, clip(r, 1-eps_low, 1+eps_high) A).

    Returns sums, not means, so the caller can normalise by the token count of the whole global batch
    (DAPO-style token-level aggregation) across micro-batches and data-parallel ranks."""
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).to(logprobs.dtype)
    return PolicyLossTerms(
        loss_sum=(per_token * mask).sum(),
        clipped_tokens=(was_clipped * mask).sum().detach(),
        approx_kl_sum=(-log_ratio * mask).sum().detach(),
    )
