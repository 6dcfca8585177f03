"""GLM-4.5 (glm4_moe) through the same Megatron builder and converter: logits equal transformers'
Glm4MoeForCausalLM on the same random tiny weights, and HF -> Megatron -> HF is bit-exact."""
from __future__ import annotations

import json

import pytest
import torch

from glm5_model.convert import ExpertShard, load_hf_into_megatron, megatron_tensors, megatron_to_hf
from glm5_model.hf_checkpoint import load_hf_state_dict, make_random_checkpoint
from glm5_model.megatron_config import ParallelLayout
from glm5_model.model import build_gpt_model
from glm5_model.parallel import causal_inputs, destroy_parallel, free_port, init_parallel


@pytest.fixture(scope="module")
def glm45(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    checkpoint = make_random_checkpoint("tiny-glm45", tmp_path_factory.mktemp("glm45") / "tiny-glm45", seed=2)
    hf_config = json.loads((checkpoint / "config.json").read_text())
    init_parallel(0, 1, ParallelLayout(), master_port=free_port())
    model = build_gpt_model(hf_config)
    state = load_hf_state_dict(checkpoint)
    load_hf_into_megatron(model, state, ExpertShard.for_rank(hf_config))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    yield model.eval(), reference, state, hf_config
    destroy_parallel()


def test_glm45_logits_match_transformers(glm45):
    model, reference, _, _ = glm45
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, 33))
    position_ids, mask = causal_inputs(tokens)
    with torch.no_grad():
        ours, theirs = model(tokens, position_ids, mask), reference(tokens).logits
    diff = (ours - theirs).abs()
    print(f"\nGLM-4.5 tiny: max |logit diff| {diff.max().item():.2e}, mean {diff.mean().item():.2e}")
    assert diff.max().item() <= 1e-4, f"max {diff.max().item():.3e} mean {diff.mean().item():.3e}"


def test_glm45_round_trip_is_exact(glm45):
    model, _, state, hf_config = glm45
    exported = {}
    for name, tensor in megatron_tensors(model):
        exported.update(megatron_to_hf(name, tensor, ExpertShard.for_rank(hf_config)))
    assert sorted(exported) == sorted(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)
