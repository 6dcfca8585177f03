"""Turn-level advantage attribution for agent episodes, and how multi-turn samples become TrainItems: the loss
and the logprob metrics see the model's tokens only."""
from __future__ import annotations

import pytest
import torch

from rollout.sample import Sample, SampleStatus
from trainer.advantages import batch_advantages
from trainer.batching import make_micro_batches, plan_shape, train_items
from trainer.group import _loss_tokens
from trainer.losses import grpo_advantages


def episode(gid: int, k: int, outcome: float, turns: list[tuple[int, int]], turn_rewards: list[float]) -> Sample:
    """A finished multi-turn sample: per turn, (model tokens, observation tokens)."""
    s = Sample([1, 2, 3], gid, k, multi_turn=True, label={"env": "e", "task": {"id": "t"}})
    token_turns = []
    for t, (model, obs) in enumerate(turns):
        s.append_response([10 + t] * model, [-0.5] * model, 0)
        s.append_observation([90] * obs)
        token_turns += [t] * (model + obs)
    s.status, s.reward = SampleStatus.COMPLETED, outcome
    s.metadata.update(turn_rewards=turn_rewards, token_turns=token_turns)
    return s


def test_outcome_mode_is_grpo_on_the_outcome_alone():
    group = [episode(0, 0, 1.0, [(2, 3), (2, 0)], [0.5, 0.0]), episode(0, 1, 0.0, [(1, 1), (3, 0)], [0.0, 0.0])]
    adv = batch_advantages(group, 2, "outcome")
    assert adv == pytest.approx(grpo_advantages(torch.tensor([1.0, 0.0]), 2).tolist())


def test_episode_mode_adds_turn_rewards_to_the_outcome():
    # Same outcome, but the first episode earned a turn reward: it must be preferred.
    group = [episode(0, 0, 1.0, [(2, 3), (2, 0)], [0.5, 0.0]), episode(0, 1, 1.0, [(1, 1), (3, 0)], [0.0, 0.0])]
    adv = batch_advantages(group, 2, "episode")
    assert adv[0] > 0 > adv[1]
    assert batch_advantages(group, 2, "outcome") == pytest.approx([0.0, 0.0])


def test_reward_to_go_credits_a_turn_with_later_rewards_only():
    # Episode 0 earns 0.5 on turn 0 and 0.3 on turn 2; episode 1 nothing. Returns from each turn on:
    # ep0: [1.8, 1.3, 1.3], ep1: [1.0, 1.0]; baseline = mean of whole-episode returns (1.4), scale their std (0.4).
    e0 = episode(0, 0, 1.0, [(2, 1), (1, 1), (2, 0)], [0.5, 0.0, 0.3])
    e1 = episode(0, 1, 1.0, [(3, 2), (2, 0)], [0.0, 0.0])
    adv = batch_advantages([e0, e1], 2, "reward_to_go", eps=0.0)
    mu, sd = 1.4, 0.4
    assert adv[0] == pytest.approx([(1.8 - mu) / sd] * 3 + [(1.3 - mu) / sd] * 2 + [(1.3 - mu) / sd] * 2)
    assert adv[1] == pytest.approx([(1.0 - mu) / sd] * 7)
    # The first turn's advantage is the episode mode's.
    assert adv[0][0] == pytest.approx(batch_advantages([e0, e1], 2, "episode", eps=0.0)[0])


def test_single_turn_samples_are_unaffected_by_the_turn_mode():
    group = []
    for k, r in enumerate([1.0, 0.0, 0.5]):
        s = Sample([1, 2], 0, k)
        s.append_response([5, 6], [-1.0, -1.0], 0)
        s.reward = r
        group.append(s)
    want = grpo_advantages(torch.tensor([1.0, 0.0, 0.5]), 3).tolist()
    for mode in ("outcome", "episode", "reward_to_go"):
        assert batch_advantages(group, 3, mode) == pytest.approx(want)


def test_mismatched_token_turns_name_the_sample():
    s = episode(4, 1, 1.0, [(2, 1)], [0.0])
    s.metadata["token_turns"] = [0]
    other = episode(4, 0, 0.0, [(1, 0)], [0.0])
    with pytest.raises(ValueError, match="sample 4/1"):
        batch_advantages([other, s], 2, "reward_to_go")


def test_observation_tokens_are_neither_trained_nor_counted():
    e0 = episode(0, 0, 1.0, [(2, 3), (2, 0)], [0.0, 0.0])
    e1 = episode(0, 1, 0.0, [(1, 1), (3, 0)], [0.0, 0.0])
    adv = batch_advantages([e0, e1], 2, "reward_to_go")
    items = train_items([e0, e1], adv, train_version=0)
    assert [_loss_tokens(it) for it in items] == [4.0, 4.0]
    (mb,) = make_micro_batches(items, plan_shape(items, 1, 8))
    # Row 0: prompt of 3, response [m m o o o m m]; target t predicts token t+1, so the response starts at t=2.
    assert mb.loss_mask[0, 2:9].tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert mb.response_mask[0].tolist() == mb.loss_mask[0].tolist()
    assert mb.advantages[0, 2:9].tolist() == pytest.approx(adv[0])
    # Tokens too old for max_age are dropped on top of the observation mask.
    e0.response_versions = [0, 0, 0, 0, 0, 2, 2]
    (old, _) = train_items([e0, e1], adv, train_version=2, max_age=1)
    assert _loss_tokens(old) == 2.0
