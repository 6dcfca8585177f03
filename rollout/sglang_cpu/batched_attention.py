"""Attention over SGLang's paged KV cache for a whole batch at once, on CPU (patch D in patches.py).

SGLang's torch-native backend attends one request at a time: per layer and step, a Python loop of cache gathers
and SDPA calls, so every running request adds its own fixed overhead to each step. Here every request's cached
keys are gathered into one padded [batch, kv_heads, length, dim] tensor (padding reads slot 0 and is masked out)
and attention is one matmul-softmax-matmul. The query heads that share a key head (H = g x Hk; MLA has Hk = 1)
become that head's g query rows, so grouped and multi-query attention never copy keys per query head. At these
shapes (one or a few query rows per head, short contexts) CPU `scaled_dot_product_attention` with a mask ran ~4x
slower than the plain matmuls (256 requests x 60 keys: 1.44 vs 0.38 ms for GLM-4.5's heads, 15.8 vs 3.8 ms for
MLA's 560-wide latent keys). Same arithmetic per request as SGLang's loop; results agree within float rounding
(tests/rollout/test_batched_attention.py checks them against SGLang's own loop).
"""
from __future__ import annotations

import torch

# A prefill batch whose padded score tensor would exceed this many elements (requests x heads x longest new part
# x longest context; 2**25 floats = 128 MiB) goes through SGLang's per-request loop instead: one long prompt
# beside many short ones would otherwise pad every short one to the long one's length.
EXTEND_MAX_SCORE_ELEMENTS = 2 ** 25


def decode_attention(query: torch.Tensor, output: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     scaling: float | None, selected: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per request: query [B, H, D], caches [slots, Hk, D] / [slots, Hk, Dv], output [B, H, Dv].
    `selected` [B, L] (L = longest sequence) limits each request to those keys (DSA's top-k)."""
    batch, heads, dim = query.shape
    kv_heads = k_cache.shape[1]
    key, value, valid = _gather(k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, query.dtype)
    if selected is not None:
        valid = valid & selected
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = _attend(q, key, value, valid[:, None, None, :], _scale(scaling, dim))  # [B, Hk, g, Dv]
    output.copy_(out.reshape(batch, heads, -1))
    return output


def extend_attention(query: torch.Tensor, output: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_lens: torch.Tensor, scaling: float | None,
                     selected: torch.Tensor | None = None) -> bool:
    """Causal prefill of each request's new tokens after its cached prefix. query [T, H, D] holds the requests'
    new tokens back to back (T = sum of extend_lens), their keys are already in the cache; output [T, H, Dv].
    `selected` [B, Lq, L] (laid out by `extend_layout`) limits each query to those keys (DSA's top-k).
    Returns False, writing nothing, when the padded batch would exceed EXTEND_MAX_SCORE_ELEMENTS (never with a
    selection: SGLang's loop cannot apply it, and building it took a tensor of that size already)."""
    _, heads, dim = query.shape
    kv_heads = k_cache.shape[1]
    batch = seq_lens.shape[0]
    max_new, max_len = int(extend_lens.max()), int(seq_lens.max())
    if selected is None and batch * heads * max_new * max_len > EXTEND_MAX_SCORE_ELEMENTS:
        return False
    key, value, key_valid = _gather(k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, query.dtype)
    rows, query_valid, position = extend_layout(prefix_lens, extend_lens)
    # A padded query row (step >= its request's new length) sits past the sequence, sees every valid key and so
    # never softmaxes an all-masked row; its output is dropped. A selection keeps that true: it takes each row's
    # top-k among the keys this mask allows (padded rows included), so at least one allowed key survives.
    mask = key_valid[:, None, :] & (torch.arange(max_len, device=query.device) <= position[:, :, None])
    if selected is not None:
        mask = mask & selected
    q = query[rows].view(batch, max_new, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)
    out = _attend(q, key[:, :, None], value[:, :, None], mask[:, None, None], _scale(scaling, dim))
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, max_new, heads, -1)  # [B, Lq, H, Dv]
    output[rows[query_valid]] = out[query_valid]
    return True


def extend_layout(prefix_lens: torch.Tensor, extend_lens: torch.Tensor):
    """The padded layout of a prefill batch whose requests' new tokens lie back to back in T rows: the row of each
    [request, step] query (0 for padding), which of them are real, and each one's position in its sequence."""
    new, cached = extend_lens.to(torch.long), prefix_lens.to(torch.long)
    step = torch.arange(int(new.max()), device=new.device)
    query_valid = step < new[:, None]  # [B, Lq]
    rows = torch.where(query_valid, (torch.cumsum(new, 0) - new)[:, None] + step, 0)
    return rows, query_valid, cached[:, None] + step


def padded_slots(req_to_token, req_pool_indices, seq_lens) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's KV-cache slots, padded to the longest: slots [B, L] (padding points at slot 0, so a gather
    stays in bounds) and valid [B, L]."""
    max_len = int(seq_lens.max())
    valid = torch.arange(max_len, device=req_to_token.device) < seq_lens.to(torch.long)[:, None]
    slots = req_to_token[req_pool_indices.to(torch.long), :max_len].to(torch.long)
    return torch.where(valid, slots, torch.zeros_like(slots)), valid


def _gather(k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, dtype):
    """Each request's cached keys and values, padded to the longest: [B, Hk, L, D], [B, Hk, L, Dv], valid [B, L]."""
    slots, valid = padded_slots(req_to_token, req_pool_indices, seq_lens)
    gathered = k_cache[slots]  # [B, L, Hk, D]
    if v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride():
        value = gathered[..., :v_cache.shape[-1]]  # MLA: the values are the first Dv dims of the latent keys
    else:
        value = v_cache[slots]
    key, value = gathered.transpose(1, 2), value.transpose(1, 2)
    if key.dtype != dtype:
        key, value = key.to(dtype), value.to(dtype)
    return key, value, valid


def _attend(q, key, value, mask, scale: float) -> torch.Tensor:
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale
    scores = scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def _scale(scaling: float | None, dim: int) -> float:
    return dim ** -0.5 if scaling is None else scaling
