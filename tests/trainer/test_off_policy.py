"""Off-policy machinery through the Megatron trainer: several optimizer steps per rollout batch make the PPO clip
act (it cannot with one), decoupled PPO weights tokens by pi_prox / pi_behav, tokens past trainer.max_token_age
leave the loss, and per-token versions split the train/rollout logprob metric into current and stale tokens."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest

from rollout.sample import Sample
from trainer.batching import TrainItem, train_items
from trainer.config import TrainerConfig


def _items(seed=0, n=8):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, response = rng.randint(3, 6), rng.randint(4, 8)
        out.append(TrainItem([rng.randrange(10, 500) for _ in range(prompt + response)], prompt, 1.0,
                             [0.0] * response))
    return out


@pytest.fixture(scope="module")
def group(ray_session, tiny_checkpoint):
    from trainer.group import TrainerGroup

    g = TrainerGroup(TrainerConfig(lr=5e-2, grad_clip=0.0, num_minibatches=4), str(tiny_checkpoint))
    yield g
    g.shutdown()


def _on_policy(group, items):
    return [dataclasses.replace(it, rollout_logprobs=lp) for it, lp in zip(items, group.compute_logprobs(items))]


def test_clip_acts_only_with_several_minibatches(group):
    """Every advantage +1 and a large learning rate: after the first of four optimizer steps the policy has moved
    far enough that later steps' ratios pi / pi_prox leave [1 - 0.2, 1 + 0.28]. In one step the ratio is 1."""
    items = _on_policy(group, _items())
    four = group.train_step(items)
    assert four["train/optimizer_steps"] == 4
    assert four["train/pg_clipfrac"] > 0.05, four
    assert four["train/ppo_kl"] != 0
    group.cfg = dataclasses.replace(group.cfg, num_minibatches=1)
    try:
        one = group.train_step(_on_policy(group, _items(seed=1)))
    finally:
        group.cfg = dataclasses.replace(group.cfg, num_minibatches=4)
    assert one["train/optimizer_steps"] == 1
    assert one["train/pg_clipfrac"] == 0.0 and one["train/ppo_kl"] == 0.0


def test_versions_split_the_logprob_metric_and_age_masks_tokens(group):
    """Tokens of the current version (the engine's logprobs equal the trainer's) and stale ones (their
    behaviour logprobs are off by 0.5) are reported apart; tokens older than max_token_age get no loss."""
    base = _on_policy(group, _items(seed=2, n=4))
    samples = []
    for k, it in enumerate(base):
        n = len(it.tokens) - it.prompt_len
        versions = [3] * (n // 2) + [5] * (n - n // 2)  # half generated 2 versions ago, half by the current one
        lps = [lp - 0.5 if v == 3 else lp for lp, v in zip(it.rollout_logprobs, versions)]
        s = Sample(prompt_ids=it.tokens[:it.prompt_len], group_id=0, index_in_group=k)
        s.append_response(it.tokens[it.prompt_len:], lps, versions)
        samples.append(s)
    group.cfg = dataclasses.replace(group.cfg, num_minibatches=1)
    try:
        kept = group.train_step(train_items(samples, [1.0, -1.0, 1.0, -1.0], train_version=5), train_version=5)
        masked_items = train_items(samples, [1.0, -1.0, 1.0, -1.0], train_version=5, max_age=1)
        masked = group.train_step(masked_items, train_version=5)
    finally:
        group.cfg = dataclasses.replace(group.cfg, num_minibatches=4)
    old_tokens = sum(n // 2 for n in (len(it.tokens) - it.prompt_len for it in base))
    assert kept["train/train_rollout_logprob_abs_diff_current"] < 1e-4
    assert kept["train/train_rollout_logprob_abs_diff_stale"] == pytest.approx(0.5, abs=1e-4)
    assert kept["train/stale_token_frac"] == pytest.approx(old_tokens / kept["train/response_tokens"])
    assert kept["train/masked_tokens"] == 0
    assert masked["train/masked_tokens"] == old_tokens
    assert all(m == (0.0 if v == 3 else 1.0) for it in masked_items for m, v in zip(it.loss_mask, it.rollout_versions))


def test_decoupled_ppo_weights_are_uncapped_behaviour_ratios(ray_session, tiny_checkpoint):
    """decoupled_ppo weights each token by pi_prox / pi_behav without truncation (here e^5 ~ 148: the engine saw
    every token as e^5 times less likely); with tis_clip set the same weights are truncated (TIS)."""
    from trainer.group import TrainerGroup

    items = _items(seed=3, n=4)
    for cfg, expected in [(TrainerConfig(lr=1e-4, decoupled_ppo=True), math.exp(5.0)),
                          (TrainerConfig(lr=1e-4, decoupled_ppo=True, tis_clip=2.0), 2.0)]:
        g = TrainerGroup(cfg, str(tiny_checkpoint))
        try:
            own = g.compute_logprobs(items)
            shifted = [dataclasses.replace(it, rollout_logprobs=[v - 5.0 for v in lp]) for it, lp in zip(items, own)]
            m = g.train_step(shifted)
        finally:
            g.shutdown()
        assert m["train/tis_weight_mean"] == pytest.approx(expected, rel=1e-3)
