"""Saving and restoring the trainer's state (weights, Adam moments, RNG) resumes training exactly."""
from __future__ import annotations

import random

import pytest
import ray
import torch

from trainer.batching import TrainItem
from trainer.config import TrainerConfig


def _items(seed):
    rng = random.Random(seed)
    out = []
    for _ in range(6):
        prompt, response = rng.randint(3, 6), rng.randint(2, 8)
        out.append(TrainItem([rng.randrange(10, 500) for _ in range(prompt + response)], prompt,
                             rng.uniform(-1, 1), [-3.0] * response))
    return out


def _weights(group):
    return dict(ray.get(group.export_weights()))


CFG = TrainerConfig(lr=1e-3, world_size=2, expert_parallel=2)


@pytest.fixture(scope="module")
def saved(ray_session, tiny_checkpoint, tmp_path_factory):
    """A DP2+EP2 group's state after one step, and its weights after a second step."""
    from trainer.group import TrainerGroup

    state = tmp_path_factory.mktemp("trainer-state")
    group = TrainerGroup(CFG, str(tiny_checkpoint))
    try:
        group.train_step(_items(1))
        group.save_state(str(state))
        group.train_step(_items(2))
        return state, _weights(group)
    finally:
        group.shutdown()


def test_resume_continues_exactly(saved, tiny_checkpoint):
    from trainer.group import TrainerGroup

    state, continuous = saved
    second = _items(2)
    resumed_group = TrainerGroup(CFG, str(tiny_checkpoint))
    try:
        resumed_group.load_state(str(state))
        resumed_group.train_step(second)
        resumed = _weights(resumed_group)
    finally:
        resumed_group.shutdown()
    assert sorted(resumed) == sorted(continuous)
    differ = [k for k in continuous if not torch.equal(resumed[k], continuous[k])]
    assert not differ, f"resumed training differs in {differ[:5]}"

    # The saved state matters: the same second step from the initial weights lands elsewhere.
    fresh_group = TrainerGroup(CFG, str(tiny_checkpoint))
    try:
        fresh_group.train_step(second)
        fresh = _weights(fresh_group)
    finally:
        fresh_group.shutdown()
    assert max((fresh[k] - continuous[k]).abs().max().item() for k in continuous) > 1e-4


def test_resume_with_another_layout_names_the_fields(saved, tiny_checkpoint):
    from trainer.group import TrainerGroup

    state, _ = saved
    other = TrainerGroup(TrainerConfig(lr=1e-3, world_size=2), str(tiny_checkpoint))  # DP2, no EP
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="expert_parallel.*2 -> 1.*trainer.world_size"):
            other.load_state(str(state))
    finally:
        other.shutdown()
