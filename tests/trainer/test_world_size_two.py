"""World size 2 on CPU with gloo (data parallel 2, and expert parallel 2) takes the same step as world size 1."""
from __future__ import annotations

import random

import pytest

from trainer.batching import TrainItem
from trainer.config import TrainerConfig


def _items(n=8, seed=0):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        prompt, response = rng.randint(3, 8), rng.randint(1, 10)
        tokens = [rng.randrange(512) for _ in range(prompt + response)]
        items.append(TrainItem(tokens, prompt, rng.uniform(-1, 1), [-6.0] * response))
    return items


def _step_then_logprobs(checkpoint, world_size, expert_parallel, items):
    from trainer.group import TrainerGroup

    group = TrainerGroup(TrainerConfig(world_size=world_size, expert_parallel=expert_parallel, lr=1e-3),
                         str(checkpoint))
    try:
        metrics = group.train_step(items)
        return metrics, group.compute_logprobs(items)
    finally:
        group.shutdown()


@pytest.mark.parametrize("expert_parallel", [1, 2])
def test_world2_matches_world1(ray_session, tiny_checkpoint, expert_parallel):
    items = _items()
    ref_metrics, ref = _step_then_logprobs(tiny_checkpoint, 1, 1, items)
    metrics, got = _step_then_logprobs(tiny_checkpoint, 2, expert_parallel, items)
    assert metrics["train/grad_norm"] == pytest.approx(ref_metrics["train/grad_norm"], rel=1e-5)
    assert metrics["train/pg_loss"] == pytest.approx(ref_metrics["train/pg_loss"], rel=1e-5, abs=1e-7)
    worst = max(abs(a - b) for x, y in zip(got, ref) for a, b in zip(x, y))
    assert worst <= 1e-5, f"post-step logprobs differ by {worst:.2e} between world 2 (EP{expert_parallel}) and 1"
