"""trainer.compact_batch: a GRPO batch is trained on its distinct samples of non-zero advantage only, each weighing
as many copies as it has, and the gradient is the one the whole batch gives."""
from __future__ import annotations

import dataclasses
import random

import pytest
import ray
import torch

from trainer.batching import TrainItem, compact_items
from trainer.config import TrainerConfig


def _item(tokens, adv, lps=None, **kw):
    n = len(tokens) - 3
    return TrainItem(list(tokens), 3, adv, lps or [-1.0] * n, **kw)


def test_copies_merge_into_one_row_weighing_as_many():
    a, b = _item([5, 6, 7, 8, 9], 0.5), _item([5, 6, 7, 8, 10], -0.5)
    out = compact_items([a, b, a, a, b])
    assert [(it.tokens, it.weight) for it in out] == [(a.tokens, 3.0), (b.tokens, 2.0)]


def test_rows_that_differ_in_anything_the_loss_reads_stay_apart():
    base = _item([5, 6, 7, 8, 9], 0.5)
    variants = [dataclasses.replace(base, advantage=0.25), dataclasses.replace(base, rollout_logprobs=[-1.0, -1.5]),
                dataclasses.replace(base, rollout_versions=[0, 1]), dataclasses.replace(base, loss_mask=[1.0, 0.0]),
                dataclasses.replace(base, prompt_len=2, rollout_logprobs=[-1.0] * 3)]
    assert [it.weight for it in compact_items([base, *variants])] == [1.0] * 6


def test_zero_advantage_rows_are_left_out_but_enough_stay_for_every_rank():
    moving = _item([5, 6, 7, 8, 9], 1.0)
    still = [_item([5, 6, 7] + [1] * n, 0.0) for n in (6, 2, 4)]
    turns = _item([5, 6, 7, 8, 9], 0.0, token_advantages=[0.0, 0.0])
    assert compact_items([moving, *still, turns]) == [moving]
    # Fillers are the shortest zero-advantage rows; they add nothing to the loss.
    assert compact_items(still, keep_at_least=2) == [still[1], still[2]]
    assert compact_items([moving, *still], keep_at_least=3) == [moving, still[1], still[2]]
    # A multi-turn row is still while every token's advantage is 0.
    assert compact_items([_item([5, 6, 7, 8, 9], 0.0, token_advantages=[0.0, 0.5])])[0].token_advantages == [0.0, 0.5]


def _grpo_like_batch(seed=0):
    """Four groups of four: one all copies of one response (advantage 0), one with two distinct responses (each
    twice), two of distinct responses; behaviour logprobs per response, as an engine reports them."""
    rng = random.Random(seed)

    def response():
        n = rng.randint(3, 9)
        prompt = [rng.randrange(10, 500) for _ in range(rng.randint(3, 6))]
        return prompt + [rng.randrange(10, 500) for _ in range(n)], len(prompt), [rng.uniform(-4, -0.5)
                                                                                  for _ in range(n)]

    items = []
    same = response()
    items += [TrainItem(same[0], same[1], 0.0, same[2]) for _ in range(4)]
    pair = [response(), response()]
    items += [TrainItem(t, p, adv, lp) for (t, p, lp), adv in zip(pair * 2, [1.0, -1.0] * 2)]
    for _ in range(2):
        items += [TrainItem(t, p, rng.uniform(-1.5, 1.5), lp) for t, p, lp in (response() for _ in range(4))]
    return items


@pytest.mark.parametrize("minibatches", [1, 2])
def test_the_compacted_batch_gives_the_whole_batchs_gradient(ray_session, tiny_checkpoint, minibatches):
    from trainer.group import TrainerGroup

    # lr 0: both steps start from the same weights; TIS makes each token's weight read its behaviour logprob.
    group = TrainerGroup(TrainerConfig(lr=0.0, grad_clip=0.0, tis_clip=2.0, num_minibatches=minibatches),
                         str(tiny_checkpoint))
    try:
        items = _grpo_like_batch()
        runs = {}
        for compact in (True, False):
            group.cfg = dataclasses.replace(group.cfg, compact_batch=compact)
            metrics = group.train_step(items)
            runs[compact] = metrics, dict(ray.get(group.export_weights(grads=True)))
    finally:
        group.shutdown()
    (fast, fast_grads), (full, full_grads) = runs[True], runs[False]
    assert fast["train/rows_trained_frac"] < 0.7 and full["train/rows_trained_frac"] == 1.0
    moved = [k for k in full_grads if full_grads[k].abs().max() > 0]
    assert len(moved) > len(full_grads) // 2
    for k in full_grads:
        torch.testing.assert_close(fast_grads[k], full_grads[k], rtol=1e-4, atol=1e-7, msg=k)
    for key in ("train/pg_loss", "train/pg_clipfrac", "train/loss_tokens", "train/response_tokens",
                "train/stale_token_frac"):
        assert fast[key] == pytest.approx(full[key], rel=1e-5, abs=1e-8), key
