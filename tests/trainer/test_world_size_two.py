"""World size 2 on CPU with gloo (data parallel 2, and expert parallel 2) takes the same step as world size 1."""
from __future__ import annotations

import random

import pytest
import ray
import torch

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


def _step_then_logprobs(checkpoint, items, **layout):
    from glm5_model.hf_checkpoint import load_hf_state_dict
    from trainer.group import TrainerGroup

    group = TrainerGroup(TrainerConfig(lr=1e-3, **layout), str(checkpoint))
    try:
        # HF -> Megatron (this layout) -> HF is bit-exact before any training.
        loaded = dict(ray.get(group.export_weights()))
        original = load_hf_state_dict(checkpoint)
        assert sorted(loaded) == sorted(original)
        inexact = [k for k in original if not torch.equal(loaded[k], original[k])]
        assert not inexact, f"round trip through {layout} changed {inexact[:5]}"
        _check_offline_conversion_matches_live_ranks(group, checkpoint, layout)
        metrics = group.train_step(items)
        metrics["grads"] = dict(ray.get(group.export_weights(grads=True)))
        return metrics, group.compute_logprobs(items), ray.get(group.export_weights())
    finally:
        group.shutdown()


def _check_offline_conversion_matches_live_ranks(group, checkpoint, layout):
    """The offline converter's per-rank files hold exactly what each live rank loaded."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from glm5_model.checkpoint_layout import Layout, hf_to_megatron

    meg = hf_to_megatron(checkpoint, Path(tempfile.mkdtemp()) / "meg",
                         Layout(tp=layout.get("tensor_parallel", 1), ep=layout.get("expert_parallel", 1),
                                pp=layout.get("pipeline_parallel", 1),
                                pp_first=layout.get("pipeline_first_stage_layers"),
                                pp_last=layout.get("pipeline_last_stage_layers")), progress=False)
    for rank, info in zip(group.ranks, group.info):
        files = {}
        rank_dir = f"mp_rank_{info['tp_rank']:02d}_{info['pp_rank']:03d}_{info['expert_shard'][0]:03d}"
        for f in sorted((meg / rank_dir).glob("*")):
            files.update(load_file(str(f)))
        live = ray.get(rank.local_tensors.remote())
        assert sorted(files) == sorted(live), f"rank {info['rank']}: names differ"
        differ = [n for n in live if not torch.equal(files[n], live[n])]
        assert not differ, f"rank {info['rank']}: offline conversion differs from the live load in {differ[:3]}"


def _assert_same_gradients(grads, ref, layout):
    """The reduced gradient of every trained tensor equals world 1's: max |diff| <= 1e-5 x the tensor's largest
    gradient entry (fp32 reduction order differs between layouts; a layout bug is orders of magnitude larger,
    e.g. the TP2 rotary-key bug moved gradients by 0.1-0.6%)."""
    assert sorted(grads) == sorted(ref), f"{layout}: gradient names differ"
    for name, g in grads.items():
        scale = max(ref[name].abs().max().item(), 1e-12)
        worst = (g - ref[name]).abs().max().item()
        assert worst <= 1e-5 * scale, f"{layout}: gradient of {name} differs by {worst:.2e} (max {scale:.2e})"


@pytest.fixture(scope="module")
def world1_reference(ray_session, tiny_checkpoint):
    return _step_then_logprobs(tiny_checkpoint, _items(), world_size=1)


@pytest.mark.parametrize("layout", [
    {"expert_parallel": 1, "tensor_parallel": 1},                             # DP2
    {"expert_parallel": 2, "tensor_parallel": 1},                             # DP2 + EP2
    {"expert_parallel": 1, "tensor_parallel": 2, "sequence_parallel": True},  # TP2 + SP
    {"expert_parallel": 2, "tensor_parallel": 2, "sequence_parallel": True},  # TP2 + SP + EP2
], ids=["dp2", "dp2-ep2", "tp2-sp", "tp2-sp-ep2"])
def test_world2_matches_world1(world1_reference, tiny_checkpoint, layout):
    _assert_same_step(_step_then_logprobs(tiny_checkpoint, _items(), world_size=2, **layout), world1_reference,
                      layout)


def _assert_same_step(result, reference, layout):
    """Same gradients, grad norm, loss and post-step logprobs as world 1, and the same exported weights."""
    metrics, got, weights = result
    ref_metrics, ref, ref_weights = reference
    _assert_same_gradients(metrics["grads"], ref_metrics["grads"], layout)
    assert metrics["train/grad_norm"] == pytest.approx(ref_metrics["train/grad_norm"], rel=1e-5)
    assert metrics["train/pg_loss"] == pytest.approx(ref_metrics["train/pg_loss"], rel=1e-5, abs=1e-7)
    assert metrics["train/response_tokens"] == ref_metrics["train/response_tokens"]
    worst = max(abs(a - b) for x, y in zip(got, ref) for a, b in zip(x, y))
    assert worst <= 1e-5, f"post-step logprobs differ by {worst:.2e} between world 2 {layout} and world 1"
    # The exported (gathered) weights after the step are the same full tensors.
    ref_weights, weights = dict(ref_weights), dict(weights)
    assert sorted(weights) == sorted(ref_weights)
    # Adam divides by sqrt(v): for near-zero gradients a reduction-order difference in fp32 moves the update by a
    # visible fraction of lr (1e-3); 1e-4 (a tenth of one step) is far below any real layout bug.
    wdiff = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert wdiff <= 1e-4, f"{layout}: exported weights differ by {wdiff:.2e}"


def test_uneven_pipeline_stages_match_world1(world1_reference, tiny_checkpoint):
    """The tiny model's 3 layers on PP2 as 1 + 2 (Megatron's num_layers_in_first_pipeline_stage; GLM-5's 78
    layers on PP8 need the same): 1F1B over gloo takes world 1's step, and the offline converter's uneven split
    matches what each stage loads."""
    layout = {"pipeline_parallel": 2, "pipeline_first_stage_layers": 1, "micro_batch_size": 2}
    _assert_same_step(_step_then_logprobs(tiny_checkpoint, _items(), world_size=2, **layout), world1_reference,
                      layout)


@pytest.fixture(scope="module")
def four_layer_checkpoint(tmp_path_factory):
    from glm5_model.hf_checkpoint import make_random_checkpoint

    return make_random_checkpoint("tiny", tmp_path_factory.mktemp("pp") / "tiny4", seed=5,
                                  overrides={"num_hidden_layers": 4})


def test_pipeline_parallel_2_matches_world1(ray_session, four_layer_checkpoint):
    """PP2 (layers 0-1 | 2-3, Megatron's 1F1B schedule over gloo point-to-point) takes world 1's step."""
    items = _items()
    reference = _step_then_logprobs(four_layer_checkpoint, items, world_size=1)
    result = _step_then_logprobs(four_layer_checkpoint, items, world_size=2, pipeline_parallel=2, micro_batch_size=2)
    _assert_same_step(result, reference, "PP2")


@pytest.mark.parametrize("rate", [0.0, 1e-2])
def test_aux_loss_free_bias_update(ray_session, tiny_checkpoint, rate):
    """With a bias update rate the router's selection bias moves after a step (toward balance); with 0 it stays
    as the checkpoint has it, the default in RL."""
    from glm5_model.hf_checkpoint import load_hf_state_dict
    from trainer.group import TrainerGroup

    group = TrainerGroup(TrainerConfig(lr=1e-3, moe_router_bias_update_rate=rate), str(tiny_checkpoint))
    try:
        group.train_step(_items())
        after = dict(ray.get(group.export_weights()))
    finally:
        group.shutdown()
    before = load_hf_state_dict(tiny_checkpoint)
    bias = [k for k in before if k.endswith("e_score_correction_bias")]
    moved = max((after[k] - before[k]).abs().max().item() for k in bias)
    if rate == 0.0:
        assert moved == 0.0
    else:
        assert moved == pytest.approx(rate, rel=1e-5)  # sign updates of exactly `rate` per step


def test_glm45_tensor_parallel_matches_world1(ray_session, tmp_path):
    """GLM-4.5 (GQA with fused linear_qkv) under TP2 + SP + EP2 takes world 1's step, and each live rank holds
    exactly what the offline converter writes for it."""
    from glm5_model.hf_checkpoint import make_random_checkpoint

    checkpoint = make_random_checkpoint("tiny-glm45", tmp_path / "glm45", seed=6)
    items = _items()
    ref_metrics, ref, _ = _step_then_logprobs(checkpoint, items, world_size=1)
    layout = {"tensor_parallel": 2, "expert_parallel": 2, "sequence_parallel": True}
    metrics, got, _ = _step_then_logprobs(checkpoint, items, world_size=2, **layout)
    _assert_same_gradients(metrics["grads"], ref_metrics["grads"], layout)
    worst = max(abs(a - b) for x, y in zip(got, ref) for a, b in zip(x, y))
    assert worst <= 1e-5, f"post-step logprobs differ by {worst:.2e}"
