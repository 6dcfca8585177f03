from __future__ import annotations

import pytest
import torch

from trainer.batching import TrainItem, longest_first, make_micro_batches, plan_shape, shard_items
from trainer.losses import grpo_advantages, ppo_clip_loss, truncated_is_weights


def test_grpo_advantages_normalise_within_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    adv = grpo_advantages(rewards, group_size=4)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.all(adv[4:] == 0)  # a group with equal rewards carries no signal
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(rewards, group_size=3)


def test_ppo_clip_matches_hand_computation():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[0.5, 1.0, 1.5, 1.1]]))  # ratios
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    terms = ppo_clip_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # token 0: min(0.5, 0.8) = 0.5; token 1: 1.0; token 2: min(1.5, 1.28) = 1.28; token 3 masked
    assert terms.loss_sum.item() == pytest.approx(-(0.5 + 1.0 + 1.28))
    assert terms.clipped_tokens.item() == 1.0
    # negative advantage below the lower bound is clipped: -min(0.5 * -1, 0.8 * -1) = 0.8
    neg = ppo_clip_loss(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), torch.tensor([[-1.0]]),
                        torch.ones(1, 1), 0.2, 0.28)
    assert neg.loss_sum.item() == pytest.approx(0.8)


def test_ppo_gradient_is_advantage_weighted_logprob_gradient_on_policy():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    terms = ppo_clip_loss(logprobs, logprobs.detach(), adv, torch.ones(1, 2), 0.2, 0.28)
    terms.loss_sum.backward()
    assert torch.allclose(logprobs.grad, -adv)


def test_truncated_is_weights_scale_each_token_gradient():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.9]]))
    rollout = torch.log(torch.tensor([[0.5, 0.1, 0.9]]))  # the engine saw token 1 as much less likely
    weights = truncated_is_weights(old, rollout, clip=2.0)
    # ratios 1, 5 (truncated to 2), 1
    assert torch.allclose(weights, torch.tensor([[1.0, 2.0, 1.0]]))
    logprobs = old.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    terms = ppo_clip_loss(logprobs, logprobs.detach(), adv, torch.ones(1, 3), 0.2, 0.28, weights)
    terms.loss_sum.backward()
    assert torch.allclose(logprobs.grad, -adv * weights)
    assert not weights.requires_grad


def _items():
    return [TrainItem(list(range(3 + i)), 2, float(i), [-1.0] * (1 + i)) for i in range(5)]


def test_micro_batches_have_equal_shapes_on_every_rank():
    items = _items()  # 3..7 tokens
    shape = plan_shape(items, dp_size=2, micro_batch_size=2)
    per_rank = [make_micro_batches(shard, shape) for shard in shard_items(items, 2)]
    assert [len(b) for b in per_rank] == [shape.num_micro] * 2
    # Micro-batch m has the same shape on every rank (expert-parallel collectives need it), padded to the longest
    # of its rows over all ranks: items 0-3 (up to 6 tokens), then item 4 (7 tokens).
    for m in range(shape.num_micro):
        assert {tuple(batches[m].tokens.shape) for batches in per_rank} == {(shape.rows, shape.micro_len(m))}
    assert shape.micro_seq_lens == (6, 7) and shape.seq_len == 7
    # Pipeline parallelism: one length for all.
    assert plan_shape(items, 2, 2, uniform=True).micro_seq_lens == (7, 7)


def test_longest_first_batches_pad_less():
    items = [TrainItem([1] * n, 1, 0.0, [0.0] * (n - 1)) for n in (5, 90, 6, 100, 4, 95)]
    mixed = plan_shape(items, 1, 2)
    ordered = [items[i] for i in longest_first(items)]
    sorted_shape = plan_shape(ordered, 1, 2)
    assert [len(it.tokens) for it in ordered] == [100, 95, 90, 6, 5, 4]
    assert mixed.micro_seq_lens == (90, 100, 95) and sorted_shape.micro_seq_lens == (100, 90, 5)
    padded = lambda shape: sum(shape.rows * n for n in shape.micro_seq_lens)  # noqa: E731
    assert padded(sorted_shape) < 0.7 * padded(mixed)


def test_loss_mask_covers_exactly_the_response_targets():
    item = TrainItem([10, 11, 12, 13, 14], prompt_len=3, advantage=0.5, rollout_logprobs=[-0.1, -0.2])
    [mb] = make_micro_batches([item], plan_shape([item], 1, 4))
    # targets are tokens[1:]; response tokens 13, 14 are targets at positions 2 and 3
    assert mb.loss_mask.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert mb.rollout_logprobs.tolist()[0][2:] == pytest.approx([-0.1, -0.2])
    assert mb.advantages.tolist() == [[0.0, 0.0, 0.5, 0.5]]


def test_bad_item_is_rejected():
    with pytest.raises(ValueError, match="2 response tokens but 1 rollout_logprobs"):
        TrainItem([1, 2, 3, 4], 2, 0.0, [-1.0])


def test_sequence_parallel_pads_length_to_tp_multiple():
    items = _items()  # longest has 7 tokens
    assert plan_shape(items, 1, 8, seq_multiple=2).seq_len == 8
    assert plan_shape(items, 1, 8, seq_multiple=1).seq_len == 7
