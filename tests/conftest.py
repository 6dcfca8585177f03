"""Shared fixtures. Everything runs on CPU in fp32; tiny checkpoints are random-initialised per session."""
from __future__ import annotations

import pytest

# A tiny GLM-5 whose DSA top-k (8) is below the contexts tests use, so the sparse selection changes the result.
# 16 indexer heads: with 4, transformers itself has exact score ties (relu zeros) at the top-k cutoff.
SPARSE_TOPK = 8


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An HF-format tiny GLM-5 (glm_moe_dsa) checkpoint directory, shared by the whole session (read-only)."""
    from glm5_model.hf_checkpoint import make_random_checkpoint

    return make_random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def sparse_checkpoint(tmp_path_factory):
    """A tiny GLM-5 checkpoint with index_topk SPARSE_TOPK (read-only)."""
    from glm5_model.hf_checkpoint import make_random_checkpoint

    return make_random_checkpoint("tiny", tmp_path_factory.mktemp("sparse") / "tiny-topk8", seed=3,
                                  overrides={"index_topk": SPARSE_TOPK, "index_n_heads": 16})


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the tests that need actors; logical CPUs exceed the 2 cores on purpose (actors mostly
    wait on each other)."""
    import ray

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
