"""GLM-5's DeepSeek Sparse Attention on CPU engines (patch E in patches.py).

SGLang's DSA path is CUDA-only (its indexer, key cache and sparse attention backends are GPU kernels), so patch C
builds GLM-5 without it. Here each attention layer of a GLM-5 model gets a pure-torch indexer, attached as
`self_attn.indexer` with the checkpoint's own parameter names (`wq_b`, `wk`, `k_norm`, `weights_proj`), so loading
from disk, both weight-update calls and the weight read-back fill and see it like any other parameter.

Per forward, a pre-hook on the attention layer runs the indexer as transformers' GLM-5 does (and Megatron's DSA,
which matches it: tests/glm5_model/test_sparse_attention.py): keys k_norm(wk(x)) and queries wq_b(q_lora), their
first rope dims rotated with interleaved rope, score = sum over heads of weight_h * relu(q_h . k) / sqrt(dim), the
top `index_topk` of each query's causal past selected. Keys go to a per-layer indexer key cache addressed by the
same KV-cache slots as the layer's latent cache, so prefix caching and chunked prefill reuse them. The selection,
laid out like the batched attention's padded score tensor (rollout/sglang_cpu/batched_attention.py), is handed to
that attention through `current_selection()` for the duration of the layer's forward. Layers that reuse another
layer's top-k ("shared" in `indexer_types`) are refused by name, as the Megatron model refuses them.

While every context in the batch fits in `index_topk` the selection is everything: the indexer then only writes
its keys (needed once a context outgrows top-k) and the attention stays dense.
"""
from __future__ import annotations

import threading

import torch

from rollout.sglang_cpu.batched_attention import extend_layout, padded_slots

INDEXER_NORM_EPS = 1e-6  # GLM-5's indexer key LayerNorm, fixed in transformers' GlmMoeDsaIndexer


class _Current(threading.local):
    selection: torch.Tensor | None = None  # the running layer's [B, L] (decode) or [B, Lq, L] (extend) mask


_current = _Current()


def current_selection() -> torch.Tensor | None:
    """The selected-and-causal key mask of the attention layer running now, or None (dense)."""
    return _current.selection


class CpuIndexer(torch.nn.Module):
    """DSA's lightning indexer in plain torch, with transformers' GLM-5 parameter names and layout (rope dims
    first in each head)."""

    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int, topk: int):
        super().__init__()
        if rope_dim > head_dim or rope_dim % 2:
            raise ValueError(f"DSA indexer: qk_rope_head_dim={rope_dim} must be even and <= index_head_dim="
                             f"{head_dim}")
        self.n_heads, self.head_dim, self.rope_dim, self.topk = n_heads, head_dim, rope_dim, topk
        self.wq_b = torch.nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = torch.nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = torch.nn.LayerNorm(head_dim, eps=INDEXER_NORM_EPS)
        self.weights_proj = torch.nn.Linear(hidden_size, n_heads, bias=False)
        self.keys: torch.Tensor | None = None  # [KV-cache slots, head_dim], sized to the pool on first use

    @torch.no_grad()
    def select(self, attn, positions: torch.Tensor, hidden: torch.Tensor, batch) -> torch.Tensor | None:
        """Writes this forward's indexer keys and returns the selection mask, or None when it keeps every key."""
        from sglang.srt.model_executor.forward_context import get_attn_backend

        backend = get_attn_backend()  # the KV pools live on the attention backend, not on the batch
        hidden = hidden.float()
        cos, sin = _cos_sin(attn.rotary_emb, positions)
        keys = self._keys(backend.token_to_kv_pool.get_key_buffer(attn.layer_id).shape[0])
        key = _rope_first(self.k_norm(self.wk(hidden.to(self.wk.weight.dtype))).float(), cos, sin, self.rope_dim)
        keys[batch.out_cache_loc.to(torch.long)] = key
        max_len = int(batch.seq_lens.max())
        if max_len <= self.topk:
            return None
        q_lora = attn.q_a_layernorm(attn.fused_qkv_a_proj_with_mqa(hidden.to(self.wq_b.weight.dtype))[0]
                                    [..., :attn.q_lora_rank])
        query = self.wq_b(q_lora).float().view(-1, self.n_heads, self.head_dim)
        query = _rope_first(query, cos[:, None], sin[:, None], self.rope_dim)
        weights = self.weights_proj(hidden.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5
        slots, key_valid = padded_slots(backend.req_to_token_pool.req_to_token, batch.req_pool_indices,
                                        batch.seq_lens)
        cached = keys[slots]  # [B, L, D]
        scale = self.head_dim ** -0.5
        if batch.forward_mode.is_decode():
            # One query per request: [B, H, D] x [B, L, D] -> [B, H, L], weighted over heads -> [B, L].
            scores = torch.relu(torch.einsum("bhd,bld->bhl", query, cached) * scale)
            scores = torch.einsum("bh,bhl->bl", weights, scores)
            allowed = key_valid
        else:
            rows, _, position = extend_layout(batch.extend_prefix_lens, batch.extend_seq_lens)
            q = query[rows]  # [B, Lq, H, D]
            scores = torch.relu(torch.einsum("bqhd,bld->bqhl", q, cached) * scale)
            scores = torch.einsum("bqh,bqhl->bql", weights[rows], scores)
            allowed = key_valid[:, None, :] & (torch.arange(max_len) <= position[:, :, None])
        scores = scores.masked_fill(~allowed, float("-inf"))
        top = scores.topk(min(self.topk, max_len), dim=-1).indices
        return torch.zeros_like(allowed).scatter_(-1, top, True) & allowed

    def _keys(self, slots: int) -> torch.Tensor:
        if self.keys is None or self.keys.shape[0] != slots:
            self.keys = torch.zeros(slots, self.head_dim, dtype=torch.float32)
        return self.keys


def _cos_sin(rotary_emb, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's rotation angles, [T, rope_dim / 2], from the attention's own rope cache
    (cat(cos, sin) per position in SGLang's rotary embeddings)."""
    cache = rotary_emb.cos_sin_cache[positions.to(torch.long)].float()
    return cache.chunk(2, dim=-1)


def _rope_first(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Interleaved rope on the first `rope_dim` dims: pairs (x0, x1), (x2, x3), ... rotated, written out as
    [rotated evens, rotated odds] like transformers (q and k share the layout, so q.k is unchanged by it)."""
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin, rest], dim=-1)


def is_glm5_dsa(config) -> bool:
    return getattr(config, "model_type", None) == "glm_moe_dsa"


def attach(attn, config) -> None:
    """Gives a GLM-5 attention layer its indexer and the hooks that run it around its forward."""
    from glm5_model.param_count import indexer_types

    shared = [i for i, kind in enumerate(indexer_types(config.to_dict())) if kind != "full"]
    if shared:
        raise ValueError(f"indexer_types: layers {shared[:5]} reuse another layer's DSA top-k ('shared'); the CPU "
                         "engine's sparse attention (like the Megatron model) builds an indexer in every layer")
    attn.indexer = CpuIndexer(config.hidden_size, attn.q_lora_rank, config.index_n_heads, config.index_head_dim,
                              config.qk_rope_head_dim, config.index_topk)

    def before(module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
        batch = kwargs["forward_batch"] if "forward_batch" in kwargs else args[2]
        empty = hidden.shape[0] == 0
        _current.selection = None if empty else module.indexer.select(module, positions, hidden, batch)

    def after(module, args, output):
        _current.selection = None

    attn.register_forward_pre_hook(before, with_kwargs=True)
    attn.register_forward_hook(after)
