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


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token truncated importance weights min(pi_old / pi_rollout, clip), without gradient.

    The engine samples with its own numerics, and with partial rollouts a response can hold tokens of older
    policies; pi_old (the trainer's logprob before the step) over pi_rollout (the logprob the engine reported)
    corrects the gradient toward the policy being trained, and the truncation bounds its variance."""
    return torch.exp(old_logprobs - rollout_logprobs).clamp(max=clip).detach()


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, eps_low: float, eps_high: float,
                  token_weights: torch.Tensor | None = None) -> PolicyLossTerms:
    """Token-level PPO clip with asymmetric bounds (clip-higher): -min(r A, clip(r, 1-eps_low, 1+eps_high) A),
    each token's term scaled by `token_weights` when given (truncated importance sampling).

    Returns sums, not means, so the caller can normalise by the token count of the whole global batch
    (DAPO-style token-level aggregation) across micro-batches and data-parallel ranks."""
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights
    was_clipped = (clipped < unclipped).to(logprobs.dtype)
    return PolicyLossTerms(
        loss_sum=(per_token * mask).sum(),
        clipped_tokens=(was_clipped * mask).sum().detach(),
        approx_kl_sum=(-log_ratio * mask).sum().detach(),
    )
