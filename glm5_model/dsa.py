"""DeepSeek Sparse Attention for GLM-5 on megatron-core's DSA modules (DSAttention + DSAIndexer).

megatron-core 0.16.1 ships the indexer and an unfused sparse attention; what GLM-5 needs on top of it:
- a spec that works without TransformerEngine: the stock DSA spec asks the backend for fused layer-norm linears
  (None on the local backend) and TE-only `parallel_mode` linears, so the indexer's projections here are plain
  replicated linears (the indexer is small and duplicated on every tensor-parallel rank, as in Megatron's TE spec);
- GLM-5's indexer key norm is a LayerNorm with eps 1e-6 (Megatron would use the model's layernorm_epsilon);
- the indexer's rotary half comes first in transformers' GLM-5 head layout and last in Megatron's, so
  glm5_model/convert.py permutes wq_b / wk / k_norm rows (the q.k scores are unchanged by a shared permutation);
- Megatron rotates q and k with a Hadamard transform (CUDA-only kernel, bf16 only). It is orthogonal and applied
  to both, so q.k is unchanged in exact arithmetic; glm5_model/compat.py makes it the identity without the kernel.

The indexer is frozen during RL (its top-k is not differentiable and Megatron detaches its inputs); its weights
are loaded, exported and served unchanged.
"""
from __future__ import annotations

import functools

import torch

from glm5_model.compat import param_device

INDEXER_NORM_EPS = 1e-6


class ReplicatedLinear(torch.nn.Module):
    """A full (not sharded) linear with Megatron's build_module signature; returns (output, None)."""

    def __init__(self, input_size: int, output_size: int, *, config=None, init_method=None, bias: bool = False,
                 skip_bias_add: bool = False, skip_weight_param_allocation: bool = False, parallel_mode=None,
                 **_unused):
        super().__init__()
        device = param_device(config)
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, device=device, dtype=dtype))
        if init_method is not None:
            init_method(self.weight)
        self.bias = torch.nn.Parameter(torch.zeros(output_size, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight, self.bias), None


class IndexerLayerNorm(torch.nn.LayerNorm):
    """The indexer key norm: LayerNorm with bias and GLM-5's fixed eps."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = INDEXER_NORM_EPS, **_unused):
        super().__init__(hidden_size, eps=INDEXER_NORM_EPS, dtype=getattr(config, "params_dtype", torch.float32),
                         device=param_device(config))


@functools.lru_cache(maxsize=None)
def _frozen_indexer_attention_class():
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAttention

    class FrozenIndexerDSAttention(DSAttention):
        """Megatron computes the indexer's KL loss on every training forward, even with coefficient 0, where it
        only costs time (a full [b, heads, s, s] attention pass per layer). With the indexer frozen we skip it;
        `training` is only read by that branch of DSAttention.forward."""

        def forward(self, *args, **kwargs):
            if self.training and not getattr(self.config, "dsa_indexer_loss_coeff", 0.0):
                self.training = False
                try:
                    return super().forward(*args, **kwargs)
                finally:
                    self.training = True
            return super().forward(*args, **kwargs)

    return FrozenIndexerDSAttention


def dsa_core_attention_spec():
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexer,
        DSAIndexerSubmodules,
        DSAttentionSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec

    indexer = ModuleSpec(module=DSAIndexer, submodules=DSAIndexerSubmodules(
        linear_wq_b=ReplicatedLinear, linear_wk=ReplicatedLinear, k_norm=IndexerLayerNorm,
        linear_weights_proj=ReplicatedLinear))
    return ModuleSpec(module=_frozen_indexer_attention_class(), submodules=DSAttentionSubmodules(indexer=indexer))


def indexer_rope_last(rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """transformers' [rope | rest] per-head row layout -> Megatron's [rest | rope] (dim 0 is heads * head_dim)."""
    heads = rows.shape[0] // head_dim
    r = rows.reshape(heads, head_dim, *rows.shape[1:])
    return torch.cat([r[:, rope_dim:], r[:, :rope_dim]], dim=1).reshape(rows.shape)


def indexer_rope_first(rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Inverse of `indexer_rope_last`."""
    heads = rows.shape[0] // head_dim
    r = rows.reshape(heads, head_dim, *rows.shape[1:])
    return torch.cat([r[:, head_dim - rope_dim:], r[:, :head_dim - rope_dim]], dim=1).reshape(rows.shape)
