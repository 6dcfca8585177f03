"""DSA with index_topk smaller than the sequence: the Megatron model selects the same tokens as transformers'
GLM-5 and gives the same logits. 16 indexer heads: with 4, transformers itself has exact score ties at the
top-k cutoff (relu zeros) and breaks them arbitrarily."""
from __future__ import annotations

import pytest
import torch

from glm5_model.megatron_config import ParallelLayout
from glm5_model.parallel import causal_inputs, destroy_parallel, free_port, init_parallel

from ..conftest import SPARSE_TOPK as TOPK
from .reference import megatron_from_checkpoint as _megatron


@pytest.fixture(scope="module")
def world1():
    init_parallel(0, 1, ParallelLayout(), master_port=free_port())
    yield
    destroy_parallel()


def test_sparse_logits_match_transformers(world1, sparse_checkpoint):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(sparse_checkpoint, dtype=torch.float32).eval()
    ours = _megatron(sparse_checkpoint)
    dense = _megatron(sparse_checkpoint, {"index_topk": 2048})
    torch.manual_seed(1)
    tokens = torch.randint(0, 512, (2, 40))
    position_ids, mask = causal_inputs(tokens)
    with torch.no_grad():
        theirs = reference(tokens).logits
        got = ours(tokens, position_ids, mask)
        full = dense(tokens, position_ids, mask)
    diff = (got - theirs).abs()
    print(f"\nsparse DSA (topk {TOPK}, 40 tokens): max |logit diff| {diff.max().item():.2e}, mean {diff.mean().item():.2e}; "
          f"dense vs sparse max {(full - theirs).abs().max().item():.2e}")
    assert diff.max().item() <= 1e-4, f"max |logit diff| {diff.max().item():.3e} (mean {diff.mean().item():.3e})"
    # The selection must matter: attending to every token changes the logits of positions past the top-k.
    changed = (full - theirs).abs()[:, TOPK + 1:].max().item()
    assert changed > 1e-2, f"dense attention differs by only {changed:.2e}: the top-k selection did nothing"
    assert (full - theirs).abs()[:, :TOPK].max().item() <= 1e-4  # early positions see <= topk tokens anyway


def test_indexer_is_frozen(world1, sparse_checkpoint):
    model = _megatron(sparse_checkpoint)
    indexer = {n: p.requires_grad for n, p in model.named_parameters() if ".indexer." in n}
    assert indexer and not any(indexer.values())
