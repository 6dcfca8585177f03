"""Truncated importance sampling through the Megatron trainer: the per-token weight pi_old / pi_rollout
(capped) scales the policy-gradient loss exactly, and weights of 1 leave the step unchanged."""
from __future__ import annotations

import math
import random

import pytest

from trainer.batching import TrainItem
from trainer.config import TrainerConfig


def _items(seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(6):
        prompt, response = rng.randint(3, 6), rng.randint(2, 8)
        out.append(TrainItem([rng.randrange(10, 500) for _ in range(prompt + response)], prompt,
                             rng.choice([-1.0, 1.0]), [0.0] * response))
    return out


def test_tis_weights_scale_the_loss(ray_session, tiny_checkpoint):
    from trainer.group import TrainerGroup

    # One group for every step: with lr 1e-30 an optimizer step leaves the fp32 weights as they were, so each
    # step's loss and gradient are measured at the same weights (the steps differ only in tis_clip and the
    # engine logprobs, which the group's ranks read from the config and the items).
    items = _items()
    groups = {clip: TrainerGroup(TrainerConfig(lr=1e-30, tis_clip=clip), str(tiny_checkpoint)) for clip in (0.0, 2.0)}
    try:
        own = groups[0.0].compute_logprobs(items)  # the trainer's own logprobs: what pi_old will be
        on_policy = [TrainItem(it.tokens, it.prompt_len, it.advantage, lp) for it, lp in zip(items, own)]
        # The engine reports each token 4x likelier than the trainer sees it: every weight is exactly 1/4.
        shifted = [TrainItem(it.tokens, it.prompt_len, it.advantage, [v + math.log(4.0) for v in lp])
                   for it, lp in zip(items, own)]
        plain = groups[0.0].train_step(on_policy)
        ones = groups[2.0].train_step(on_policy)
        quarter = groups[2.0].train_step(shifted)
        # Tokens the engine saw as far less likely than the trainer does hit the cap.
        capped = groups[2.0].train_step([TrainItem(it.tokens, it.prompt_len, it.advantage, [v - 5.0 for v in lp])
                                         for it, lp in zip(items, own)])
        assert groups[0.0].compute_logprobs(items) == own  # the weights did not move
    finally:
        for g in groups.values():
            g.shutdown()
    assert "train/tis_weight_mean" not in plain
    assert ones["train/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert ones["train/pg_loss"] == pytest.approx(plain["train/pg_loss"], rel=1e-4, abs=1e-6)
    assert ones["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-4)
    assert quarter["train/tis_weight_mean"] == pytest.approx(0.25, rel=1e-4)
    assert quarter["train/tis_truncated_frac"] == 0.0
    assert quarter["train/pg_loss"] == pytest.approx(plain["train/pg_loss"] / 4, rel=1e-4, abs=1e-6)
    assert quarter["train/grad_norm"] == pytest.approx(plain["train/grad_norm"] / 4, rel=1e-4)
    assert capped["train/tis_truncated_frac"] == 1.0
    assert capped["train/tis_weight_mean"] == pytest.approx(2.0)
