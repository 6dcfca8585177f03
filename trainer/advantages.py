"""Advantages of a rollout batch: GRPO within each group, and for agent episodes a choice of how the episode's
rewards reach its turns (`trainer.turn_advantage`):

  outcome       the environment's outcome score only; every model token of the episode shares its advantage
                (per-turn rewards are logged, not trained on)
  episode       outcome + the sum of the per-turn rewards, one advantage for the whole episode
  reward_to_go  a turn's tokens are credited with the outcome plus the rewards of that turn and the ones after
                it, not those earned before it; baseline and scale are the group's whole-episode returns, so the
                first turn's advantage equals `episode`'s and a later turn's falls by the turn rewards behind it

Per-turn rewards live in sample.metadata["turn_rewards"] (one per model turn) and each response token's turn in
metadata["token_turns"] (rollout/agent/driver.py writes both when the episode ends)."""
from __future__ import annotations

from typing import Literal

import torch

from rollout.sample import Sample
from trainer.losses import grpo_advantages

TurnAdvantage = Literal["outcome", "episode", "reward_to_go"]


def batch_advantages(samples: list[Sample], group_size: int, mode: TurnAdvantage = "outcome",
                     eps: float = 1e-6) -> list[float | list[float]]:
    """One advantage per sample (single-turn samples, `outcome`, `episode`) or one per response token
    (multi-turn samples under `reward_to_go`), samples laid out group after group."""
    returns = [_turn_returns(s, mode) for s in samples]
    episode = torch.tensor([r[0] if r else float(s.reward) for s, r in zip(samples, returns)], dtype=torch.float32)
    advantages = grpo_advantages(episode, group_size, eps).tolist()
    if mode != "reward_to_go":
        return advantages
    grouped = episode.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size).tolist()
    std = grouped.std(dim=1, unbiased=False).repeat_interleave(group_size).tolist()
    out: list[float | list[float]] = []
    for s, r, adv, mu, sd in zip(samples, returns, advantages, mean, std):
        if not r:
            out.append(adv)
            continue
        turns = s.metadata["token_turns"]
        # A token after the last rewarded turn (the final observation) is not the model's; it gets the last turn's.
        out.append([(r[min(t, len(r) - 1)] - mu) / (sd + eps) for t in turns])
    return out


def _turn_returns(s: Sample, mode: TurnAdvantage) -> list[float]:
    """The sample's return from each of its model turns on; [] for single-turn samples and under `outcome`."""
    if not s.multi_turn or mode == "outcome":
        return []
    rewards = [float(r) for r in s.metadata.get("turn_rewards") or []]
    turns = s.metadata.get("token_turns")
    if turns is None or len(turns) != s.response_length:
        if s.response_length == 0:  # an episode that never started (its reset failed): the outcome alone
            return [float(s.reward)]
        raise ValueError(f"sample {s.key} (row {s.metadata.get('row')}): metadata token_turns has "
                         f"{None if turns is None else len(turns)} entries for {s.response_length} response tokens")
    if turns and max(turns) >= len(rewards) + 1:
        raise ValueError(f"sample {s.key}: tokens of turn {max(turns)} but {len(rewards)} turn rewards")
    togo, acc = [], 0.0
    for r in reversed(rewards or [0.0]):
        acc += r
        togo.append(acc)
    return [float(s.reward) + g for g in reversed(togo)]
