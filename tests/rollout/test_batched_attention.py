"""Patch D (rollout/sglang_cpu/batched_attention.py): attention for the whole batch at once gives what SGLang's
own per-request loop gives, for the cache layouts the CPU engines serve: MLA (one latent key head, keys 576 wide,
values the first 512 of them), grouped-query attention (GLM-4.5) and plain multi-head, with requests of different
lengths whose slots are scattered over the pool and whose unused slots hold garbage; prefill with and without a
cached prefix (group members share their prompt in the radix cache; resumed partials extend their own tokens)."""
from __future__ import annotations

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from rollout.sglang_cpu import batched_attention
from rollout.sglang_cpu.batched_attention import decode_attention, extend_attention

LAYOUTS = pytest.mark.parametrize("heads,kv_heads,dim,v_dim,mla", [
    (4, 1, 576, 512, True), (8, 2, 32, 32, False), (4, 4, 16, 16, False)], ids=["mla", "gqa", "mha"])
SLOTS, MAX_REQS, MAX_CTX = 4096, 16, 300


def _sglang(method: str):
    fn = getattr(TorchNativeAttnBackend, method)
    return getattr(fn, "__wrapped__", fn)  # SGLang's own loop, whether or not patch D is applied here


def _pool(kv_heads, dim, v_dim, mla, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(SLOTS, kv_heads, dim, generator=g)
    v_cache = k_cache[..., :v_dim] if mla else torch.randn(SLOTS, kv_heads, v_dim, generator=g)
    # slot 0 is SGLang's reserved dummy slot: real requests never own it, padding reads it
    req_to_token = torch.randint(1, SLOTS, (MAX_REQS, MAX_CTX), generator=g, dtype=torch.int32)
    return g, k_cache, v_cache, req_to_token


def _poison_padding_slot(k_cache, v_cache, mla):
    k_cache[0] = 1e4
    if not mla:
        v_cache[0] = 1e4


@LAYOUTS
def test_decode_matches_sglang_loop(heads, kv_heads, dim, v_dim, mla):
    g, k_cache, v_cache, req_to_token = _pool(kv_heads, dim, v_dim, mla)
    lens = torch.tensor([1, 7, 300, 42, 129, 3])
    pool_idx = torch.tensor([5, 0, 11, 3, 15, 8])
    query = torch.randn(len(lens), heads, dim, generator=g)
    scale = dim ** -0.5

    want = _sglang("_run_sdpa_forward_decode")(None, query, torch.empty(len(lens), heads, v_dim), k_cache, v_cache,
                                               req_to_token, pool_idx, lens, scaling=scale,
                                               enable_gqa=kv_heads != heads)
    got = decode_attention(query, torch.empty(len(lens), heads, v_dim), k_cache, v_cache, req_to_token, pool_idx,
                           lens, scale)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    _poison_padding_slot(k_cache, v_cache, mla)  # padding must stay masked out whatever it holds
    again = decode_attention(query, torch.empty(len(lens), heads, v_dim), k_cache, v_cache, req_to_token, pool_idx,
                             lens, scale)
    assert torch.equal(again, got)


@LAYOUTS
@pytest.mark.parametrize("prefixes", [[0, 0, 0, 0, 0], [0, 16, 5, 120, 299]], ids=["fresh", "cached-prefix"])
def test_extend_matches_sglang_loop(heads, kv_heads, dim, v_dim, mla, prefixes):
    g, k_cache, v_cache, req_to_token = _pool(kv_heads, dim, v_dim, mla, seed=1)
    new = torch.tensor([13, 1, 40, 7, 1])
    prefix = torch.tensor(prefixes)
    lens = prefix + new
    pool_idx = torch.tensor([2, 9, 0, 14, 6])
    query = torch.randn(int(new.sum()), heads, dim, generator=g)
    scale = dim ** -0.5

    want = _sglang("_run_sdpa_forward_extend")(None, query, torch.empty(len(query), heads, v_dim), k_cache, v_cache,
                                               req_to_token, pool_idx, lens, prefix, new, scaling=scale,
                                               enable_gqa=kv_heads != heads, causal=True)
    got = torch.full((len(query), heads, v_dim), float("nan"))
    assert extend_attention(query, got, k_cache, v_cache, req_to_token, pool_idx, lens, prefix, new, scale)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    _poison_padding_slot(k_cache, v_cache, mla)
    again = torch.empty_like(got)
    assert extend_attention(query, again, k_cache, v_cache, req_to_token, pool_idx, lens, prefix, new, scale)
    assert torch.equal(again, got)


def test_extend_too_large_to_pad_is_left_to_sglang(monkeypatch):
    """One long prompt beside short ones would pad every one to its length: past the limit nothing is written
    and the caller runs SGLang's loop."""
    g, k_cache, v_cache, req_to_token = _pool(2, 8, 8, False)
    new = torch.tensor([200, 2])
    lens = new.clone()
    query = torch.randn(int(new.sum()), 4, 8, generator=g)
    out = torch.zeros(len(query), 4, 8)
    monkeypatch.setattr(batched_attention, "EXTEND_MAX_SCORE_ELEMENTS", 2 * 4 * 200 * 200 - 1)
    assert not extend_attention(query, out, k_cache, v_cache, req_to_token, torch.tensor([0, 1]), lens,
                                torch.zeros(2, dtype=torch.long), new, None)
    assert not out.any()
