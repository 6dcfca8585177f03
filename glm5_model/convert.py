"""HF (transformers / SGLang) tensor names <-> Megatron-core GPTModel names for GLM-5, one tensor at a time.

Layouts: expert parallel (each rank holds a contiguous block of experts) and tensor parallel (a Megatron
parameter tagged `tensor_model_parallel` is split along its `partition_dim`; `partition_stride` 2 marks a gated
fc1 whose gate and up halves are split separately, so each rank holds [gate_r; up_r]).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from glm5_model.dsa import indexer_rope_first, indexer_rope_last

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_INDEXER = "self_attention.core_attention.indexer."
# Megatron indexer suffix -> (HF suffix, whether its rows carry the per-head [rope | rest] layout)
_INDEXER_TENSORS = {
    "linear_wq_b.weight": ("self_attn.indexer.wq_b.weight", True),
    "linear_wk.weight": ("self_attn.indexer.wk.weight", True),
    "k_norm.weight": ("self_attn.indexer.k_norm.weight", True),
    "k_norm.bias": ("self_attn.indexer.k_norm.bias", True),
    "linear_weights_proj.weight": ("self_attn.indexer.weights_proj.weight", False),
}

# Megatron suffix (inside decoder.layers.i) -> HF suffix (inside model.layers.i), for 1:1 tensors.
_COMMON_ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
}
# GLM-5: multi-latent attention.
_LAYER_ONE_TO_ONE = {
    **_COMMON_ONE_TO_ONE,
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
}
# GLM-4.5: grouped-query attention with per-head q/k norms; q, k, v fuse into Megatron's linear_qkv.
_GLM45_ONE_TO_ONE = {
    **_COMMON_ONE_TO_ONE,
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
_QKV = {"self_attention.linear_qkv.weight": "weight", "self_attention.linear_qkv.bias": "bias"}
# Megatron's fc1 of a gated MLP is [gate; up] stacked on the output dim.
_LAYER_GATED_FC1 = {
    "mlp.linear_fc1.weight": "mlp",
    "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts",
}
# TransformerEngine's layer spec fuses a norm into the linear after it and runs the local experts as one grouped
# GEMM, which renames those tensors. The local spec's names are the canonical ones (conversion, checkpoint files);
# `megatron_tensors` reports every tensor under its canonical name.
_TE_FUSED_NORMS = {
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # GLM-4.5
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",  # dense layers
}
_TE_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc1|linear_fc2)\.weight(\d+)$")


def canonical_name(name: str) -> str:
    """The local-spec name of a Megatron tensor name from either layer spec."""
    m = _LAYER.match(name)
    if not m:
        return name
    rest = _TE_FUSED_NORMS.get(m.group(2), m.group(2))
    grouped = _TE_GROUPED_EXPERT.match(rest)
    if grouped:
        rest = f"mlp.experts.local_experts.{grouped.group(2)}.{grouped.group(1)}.weight"
    return f"decoder.layers.{m.group(1)}.{rest}"


_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds (global expert id = ep_rank * num_local + local id), and the indexer head
    sizes needed to move its rotary half between transformers' and Megatron's layouts."""

    ep_rank: int = 0
    num_local: int = 0
    index_head_dim: int = 0
    rope_dim: int = 0
    # GLM-4.5 (glm4_moe) attention layout, for fusing q/k/v; num_kv_heads 0 means GLM-5 (MLA).
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0

    @classmethod
    def for_rank(cls, hf_config: dict, ep_rank: int = 0, ep_size: int = 1) -> "ExpertShard":
        glm45 = hf_config.get("model_type") == "glm4_moe"
        heads = hf_config["num_attention_heads"]
        return cls(ep_rank, hf_config["n_routed_experts"] // ep_size, hf_config.get("index_head_dim", 0),
                   hf_config.get("qk_rope_head_dim", 0), heads if glm45 else 0,
                   hf_config["num_key_value_heads"] if glm45 else 0,
                   (hf_config.get("head_dim") or hf_config["hidden_size"] // heads) if glm45 else 0)

    @property
    def one_to_one(self) -> dict[str, str]:
        return _GLM45_ONE_TO_ONE if self.num_kv_heads else _LAYER_ONE_TO_ONE

    def fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Megatron's linear_qkv rows: per query group, that group's query heads, then its key, then its value."""
        groups, hd = self.num_kv_heads, self.head_dim
        parts = [q.reshape(groups, -1, *q.shape[1:]), k.reshape(groups, hd, *k.shape[1:]),
                 v.reshape(groups, hd, *v.shape[1:])]
        return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        groups, hd = self.num_kv_heads, self.head_dim
        per_group = qkv.reshape(groups, -1, *qkv.shape[1:])
        q_rows = per_group.shape[1] - 2 * hd
        q, k, v = per_group.split([q_rows, hd, hd], dim=1)
        return (q.reshape(-1, *qkv.shape[1:]), k.reshape(-1, *qkv.shape[1:]), v.reshape(-1, *qkv.shape[1:]))

    def _check_indexer_dims(self, name: str) -> None:
        if not (self.index_head_dim and self.rope_dim):
            raise ValueError(f"{name}: converting indexer weights needs index_head_dim and rope_dim "
                             "(use ExpertShard.for_rank(hf_config, ...))")


def megatron_to_hf(name: str, tensor: torch.Tensor, shard: ExpertShard) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one Megatron tensor; [] for tensors HF does not have (extra state)."""
    if name in _GLOBAL:
        return [(_GLOBAL[name], tensor)]
    m = _LAYER.match(name)
    if not m:
        if name.endswith("_extra_state"):
            return []
        raise KeyError(f"no HF name for Megatron tensor {name!r}")
    layer, rest = m.group(1), m.group(2)
    prefix = f"model.layers.{layer}."
    if rest in shard.one_to_one:
        return [(prefix + shard.one_to_one[rest], tensor)]
    if rest in _QKV and shard.num_kv_heads:
        kind = _QKV[rest]
        q, k, v = shard.split_qkv(tensor)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in (("q", q), ("k", k), ("v", v))]
    if rest.startswith(_INDEXER) and rest[len(_INDEXER):] in _INDEXER_TENSORS:
        hf_suffix, permuted = _INDEXER_TENSORS[rest[len(_INDEXER):]]
        if permuted:
            shard._check_indexer_dims(name)
            tensor = indexer_rope_first(tensor, shard.index_head_dim, shard.rope_dim)
        return [(prefix + hf_suffix, tensor)]
    if rest in _LAYER_GATED_FC1:
        gate, up = tensor.chunk(2, dim=0)
        base = prefix + _LAYER_GATED_FC1[rest]
        return [(f"{base}.gate_proj.weight", gate), (f"{base}.up_proj.weight", up)]
    e = _LOCAL_EXPERT.match(rest)
    if e:
        expert = shard.ep_rank * shard.num_local + int(e.group(1))
        base = f"{prefix}mlp.experts.{expert}"
        if e.group(2) == "linear_fc1":
            gate, up = tensor.chunk(2, dim=0)
            return [(f"{base}.gate_proj.weight", gate), (f"{base}.up_proj.weight", up)]
        return [(f"{base}.down_proj.weight", tensor)]
    if rest.endswith("_extra_state"):
        return []
    raise KeyError(f"no HF name for Megatron tensor {name!r}")


def hf_source(name: str, hf_state: dict[str, torch.Tensor], shard: ExpertShard) -> torch.Tensor:
    """The Megatron tensor `name`, assembled from an HF state dict (inverse of `megatron_to_hf`)."""
    if name in _GLOBAL:
        return _get(hf_state, _GLOBAL[name], name)
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no HF source for Megatron tensor {name!r}")
    layer, rest = m.group(1), m.group(2)
    prefix = f"model.layers.{layer}."
    if rest in shard.one_to_one:
        return _get(hf_state, prefix + shard.one_to_one[rest], name)
    if rest in _QKV and shard.num_kv_heads:
        kind = _QKV[rest]
        return shard.fuse_qkv(*(_get(hf_state, f"{prefix}self_attn.{p}_proj.{kind}", name) for p in "qkv"))
    if rest.startswith(_INDEXER) and rest[len(_INDEXER):] in _INDEXER_TENSORS:
        hf_suffix, permuted = _INDEXER_TENSORS[rest[len(_INDEXER):]]
        tensor = _get(hf_state, prefix + hf_suffix, name)
        if permuted:
            shard._check_indexer_dims(name)
            tensor = indexer_rope_last(tensor, shard.index_head_dim, shard.rope_dim)
        return tensor
    if rest in _LAYER_GATED_FC1:
        base = prefix + _LAYER_GATED_FC1[rest]
        return torch.cat([_get(hf_state, f"{base}.gate_proj.weight", name),
                          _get(hf_state, f"{base}.up_proj.weight", name)], dim=0)
    e = _LOCAL_EXPERT.match(rest)
    if e:
        base = f"{prefix}mlp.experts.{shard.ep_rank * shard.num_local + int(e.group(1))}"
        if e.group(2) == "linear_fc1":
            return torch.cat([_get(hf_state, f"{base}.gate_proj.weight", name),
                              _get(hf_state, f"{base}.up_proj.weight", name)], dim=0)
        return _get(hf_state, f"{base}.down_proj.weight", name)
    raise KeyError(f"no HF source for Megatron tensor {name!r}")


def _get(hf_state: dict[str, torch.Tensor], hf_name: str, for_name: str) -> torch.Tensor:
    if hf_name not in hf_state:
        raise KeyError(f"HF checkpoint lacks {hf_name!r} (needed for Megatron {for_name!r})")
    return hf_state[hf_name]


def megatron_tensors(model: torch.nn.Module, layer_offset: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (the router's expert_bias is a buffer) of an unwrapped model, under their
    canonical names. A pipeline stage numbers its layers from 0; `layer_offset` (its first layer's global index)
    makes the names global."""
    def rename(name: str) -> str:
        m = _LAYER.match(name)
        name = f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}" if m and layer_offset else name
        return canonical_name(name)

    for name, param in model.named_parameters():
        yield rename(name), param
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            yield rename(name), buf


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _stage_owns(hf_name: str, model: torch.nn.Module, layer_offset: int) -> bool:
    """Whether this pipeline stage's model holds (a piece of) the HF tensor."""
    m = _HF_LAYER.match(hf_name)
    if m:
        return layer_offset <= int(m.group(1)) < layer_offset + len(model.decoder.layers)
    if hf_name == "model.embed_tokens.weight":
        return getattr(model, "pre_process", True)
    return getattr(model, "post_process", True)


@dataclass(frozen=True)
class TPShard:
    """This rank's place in the tensor-parallel groups (dense and expert)."""

    rank: int = 0
    size: int = 1
    expert_rank: int = 0
    expert_size: int = 1

    def for_param(self, name: str) -> tuple[int, int]:
        return (self.expert_rank, self.expert_size) if ".local_experts." in name else (self.rank, self.size)


def split_tp(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s piece: each of the `stride` parts along `dim` is split in `size`, and the rank's pieces are
    concatenated (stride 2 = a gated fc1, whose gate and up halves are split separately)."""
    return torch.cat([part.chunk(size, dim)[rank] for part in full.chunk(stride, dim)], dim=dim)


def merge_tp(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `split_tp`: the full tensor from every rank's piece (in rank order)."""
    shape = list(parts[0].shape)
    shape[dim] *= len(parts)
    return merge_tp_into(parts, dim, stride, parts[0].new_empty(shape))


def merge_tp_into(parts: list[torch.Tensor], dim: int, stride: int, out: torch.Tensor) -> torch.Tensor:
    """`merge_tp` written into `out` (the full shape; its dtype may differ, the copy casts), so a caller can merge
    straight into a send buffer without a full-size temporary."""
    offset = 0
    for s in range(stride):
        for part in parts:
            piece = part.chunk(stride, dim)[s]
            out.narrow(dim, offset, piece.shape[dim]).copy_(piece)
            offset += piece.shape[dim]
    return out


def tp_split(full: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of a full tensor for a live (possibly) tensor-parallel Megatron parameter."""
    if size == 1 or full.shape == param.shape:
        return full
    return split_tp(full, *tp_partition(param), rank, size)


def tp_merge(parts: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    return merge_tp(parts, *tp_partition(param))


def tp_partition(param: torch.Tensor) -> tuple[int, int]:
    """(dim, stride) along which a tensor-parallel Megatron parameter is split."""
    return getattr(param, "partition_dim", 0), getattr(param, "partition_stride", 1)


def is_tp_sharded(param: torch.Tensor, size: int) -> bool:
    return size > 1 and bool(getattr(param, "tensor_model_parallel", False))


@torch.no_grad()
def load_hf_into_megatron(model: torch.nn.Module, hf_state: dict[str, torch.Tensor], shard: ExpertShard,
                          tp: TPShard = TPShard(), layer_offset: int = 0) -> set[str]:
    """Copies HF weights into an (unwrapped) Megatron model; every Megatron tensor must be filled, shapes equal,
    and every HF tensor must land somewhere (experts of other expert-parallel ranks excepted). Returns the names
    of the parameters that hold a tensor-parallel piece (the ones an export must gather)."""
    used: set[str] = set()
    split: set[str] = set()
    for name, dst in megatron_tensors(model, layer_offset):
        full = hf_source(name, hf_state, shard)
        src = tp_split(full, dst, *tp.for_param(name)) if is_tp_sharded(dst, tp.for_param(name)[1]) else full
        if src.shape != dst.shape:
            raise ValueError(f"{name}: HF shape {tuple(src.shape)} != Megatron shape {tuple(dst.shape)}")
        dst.copy_(src.to(dst.dtype))
        if src is not full:
            split.add(name)
        used.update(n for n, _ in megatron_to_hf(name, full, shard))
    # Experts of other expert-parallel ranks and tensors of other pipeline stages are someone else's.
    unused = [n for n in hf_state if n not in used and ".experts." not in n and _stage_owns(n, model, layer_offset)]
    if unused:
        raise ValueError(f"HF tensors with no Megatron destination: {unused[:5]}")
    return split


if __name__ == "__main__":
    import sys

    from glm5_model.checkpoint_layout import main

    sys.exit(main())
