"""GLM-5's DeepSeek Sparse Attention served by SGLang on CPU (patch E, rollout/sglang_cpu/sparse_attention.py).

The tiny GLM-5 with index_topk 8 and contexts of ~20-40 tokens: the engine's logprobs must match Megatron's DSA
(mean abs diff <= 1e-3) on sampled generations (a batched prefill of prompts of different lengths, then decode),
on a second generation that reuses the cached prompt prefix, and on score() (a prefill over whole sequences).
Dense attention on the same weights differs by far more, so the comparison can tell the two apart."""
from __future__ import annotations

import time

import pytest
import torch

import sglang  # noqa: F401  -- no importorskip: a missing sglang must fail, not skip

from glm5_model.megatron_config import ParallelLayout
from glm5_model.parallel import causal_inputs, destroy_parallel, free_port, init_parallel
from rollout.engine import SGLangEngine
from rollout.protocol import EngineRequest

from ..conftest import SPARSE_TOPK
from ..glm5_model.reference import megatron_from_checkpoint

MEAN_TOL = 1e-3
STOP_IDS = [0, 7, 9]


@pytest.fixture(scope="module")
def megatron(sparse_checkpoint):
    """(the sparse Megatron model, the same weights with every token attended)."""
    init_parallel(0, 1, ParallelLayout(), master_port=free_port())
    try:
        yield megatron_from_checkpoint(sparse_checkpoint), megatron_from_checkpoint(sparse_checkpoint,
                                                                                    {"index_topk": 2048})
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def engine(sparse_checkpoint):
    eng = SGLangEngine(str(sparse_checkpoint), dtype="float32", max_total_tokens=8192, seed=0)
    yield eng
    eng.shutdown()


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 500, (n,), generator=g).tolist() for n in lengths]


def _generate(engine, prompts, max_new_tokens: int):
    params = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "stop_token_ids": STOP_IDS,
              "ignore_eos": True}
    return engine.generate([EngineRequest(f"dsa-{time.monotonic_ns()}-{i}", p, dict(params))
                            for i, p in enumerate(prompts)])


@torch.no_grad()
def _megatron_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    tokens = torch.tensor([prompt + output])
    position_ids, mask = causal_inputs(tokens)
    logprobs = torch.log_softmax(model(tokens, position_ids, mask)[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(output) - 1)
    return logprobs[positions, torch.tensor(output)]


def _diffs(model, prompts, outputs, logprobs) -> torch.Tensor:
    return torch.cat([(_megatron_logprobs(model, p, o) - torch.tensor(lp)).abs()
                      for p, o, lp in zip(prompts, outputs, logprobs)])


def _check(name, megatron, prompts, outputs, logprobs):
    sparse, dense = megatron
    got, vs_dense = _diffs(sparse, prompts, outputs, logprobs), _diffs(dense, prompts, outputs, logprobs)
    print(f"\n{name}: engine vs Megatron DSA (top-{SPARSE_TOPK}) mean {got.mean():.2e} max {got.max():.2e} over "
          f"{got.numel()} tokens; vs dense attention mean {vs_dense.mean():.2e}")
    assert got.mean() <= MEAN_TOL, f"{name}: mean abs logprob diff {got.mean():.3e} (max {got.max():.3e})"
    assert vs_dense.mean() > 10 * MEAN_TOL, f"{name}: dense attention agrees too ({vs_dense.mean():.2e}): the " \
                                            "contexts do not exercise the top-k selection"


def test_generate_matches_megatron_dsa(engine, megatron):
    prompts = _prompts([6, 11, 14, 20], seed=1)
    results = _generate(engine, prompts, max_new_tokens=24)
    assert all(len(r.output_ids) == 24 for r in results)
    _check("generate", megatron, prompts, [r.output_ids for r in results], [r.output_logprobs for r in results])


def test_cached_prefix_matches_megatron_dsa(engine, megatron):
    """The second request finds its prompt in the radix cache: the indexer keys of those slots are reused."""
    prompts = _prompts([18], seed=2)
    _generate(engine, prompts, max_new_tokens=4)
    results = _generate(engine, prompts * 2, max_new_tokens=20)
    _check("cached prefix", megatron, prompts * 2, [r.output_ids for r in results],
           [r.output_logprobs for r in results])


def test_score_matches_megatron_dsa(engine, megatron):
    prompts = _prompts([9, 15], seed=3)
    outputs = _prompts([25, 30], seed=4)
    scores = engine.score([p + o for p, o in zip(prompts, outputs)], [len(p) for p in prompts])
    _check("score", megatron, prompts, outputs, scores)
