"""The Megatron GLM-5 model computes what transformers' GlmMoeDsaForCausalLM computes, on the same weights."""
from __future__ import annotations

import json

import pytest
import torch

from glm5_model.convert import ExpertShard, load_hf_into_megatron, megatron_tensors, megatron_to_hf
from glm5_model.hf_checkpoint import load_hf_state_dict
from glm5_model.megatron_config import ParallelLayout, check_supported
from glm5_model.model import build_gpt_model
from glm5_model.parallel import causal_inputs, destroy_parallel, free_port, init_parallel


@pytest.fixture(scope="module")
def megatron_world1():
    init_parallel(0, 1, ParallelLayout(), master_port=free_port())
    yield
    destroy_parallel()


@pytest.fixture(scope="module")
def models(megatron_world1, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    hf_config = json.loads((tiny_checkpoint / "config.json").read_text())
    megatron = build_gpt_model(hf_config)
    hf_state = load_hf_state_dict(tiny_checkpoint)
    load_hf_into_megatron(megatron, hf_state, ExpertShard.for_rank(hf_config))
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return megatron.eval(), reference, hf_state


def test_logits_match_transformers_fp32(models):
    megatron, reference, _ = models
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (3, 37))
    position_ids, mask = causal_inputs(tokens)
    with torch.no_grad():
        ours = megatron(tokens, position_ids, mask)
        theirs = reference(tokens).logits
    diff = (ours - theirs).abs()
    assert diff.max().item() <= 1e-4, f"max |logit diff| {diff.max().item():.3e} (mean {diff.mean().item():.3e})"
    # The comparison must be able to fail: a changed weight moves logits far beyond the tolerance.
    bias = megatron.decoder.layers[1].mlp.router.expert_bias
    saved = bias.clone()
    with torch.no_grad():
        bias[0] += 5.0
        moved = megatron(tokens, position_ids, mask)
        bias.copy_(saved)
    assert (moved - theirs).abs().max().item() > 1e-2, "the selection bias had no effect on logits"


def test_hf_megatron_round_trip_is_exact(models):
    megatron, reference, hf_state = models
    exported = {}
    for name, tensor in megatron_tensors(megatron):
        exported.update(megatron_to_hf(name, tensor, ExpertShard.for_rank(reference.config.to_dict())))
    expected = hf_state
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


def test_unsupported_hf_field_is_named():
    with pytest.raises(ValueError, match="hidden_act"):
        check_supported({"model_type": "glm_moe_dsa", "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_parameters.rope_type"):
        check_supported({"rope_parameters": {"rope_type": "yarn"}})
