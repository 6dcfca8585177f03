"""Rank side, planning: which HF-named tensors each trainer rank sends, packed into buckets.

Every tensor is sent once, by the rank that owns it: dense tensors by tensor-parallel rank 0 of data-parallel
replica 0 of each pipeline stage (merged from its tensor-parallel group's pieces), routed experts by expert-TP rank
0 of expert-data-parallel replica 0 of each expert-parallel rank (its own experts only), each pipeline stage its
own layers. Names and layouts come from the one Megatron <-> HF mapping (glm5_model/convert.py).

A plan is metadata only (names, shapes, dtypes, offsets): it is made once, sent to the driver, put in one global
order and handed back to every rank and engine; each push then fills the same buckets with the current weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from glm5_model.convert import ExpertShard, megatron_tensors, megatron_to_hf, tp_partition
from rollout.weight_protocol import CHECKSUM_WORKING_BYTES, BucketLayout, layout_bucket

# SGLang keeps the router's selection bias in fp32 whatever the serving dtype (HF stores it in fp32 too: in bf16
# its spread is a few ULPs and top-k routing would reorder), so it is sent in fp32.
_FP32_SUFFIXES = ("e_score_correction_bias",)
# Bytes a bucket may grow by in padding per entry (alignment to the next entry's element size); what filling one
# needs besides the buffer and the gathers: the check entry and the checksum's working memory.
_PAD_SLACK = 8
_CHECK_BYTES = 8 * 4 + 8 + CHECKSUM_WORKING_BYTES


@dataclass(frozen=True)
class RankPlace:
    """Where a rank sits, as far as sending weights is concerned (global ranks of its groups)."""

    rank: int
    dense_sender: bool
    expert_sender: bool
    tp_group: tuple[int, ...]
    expert_tp_group: tuple[int, ...]


@dataclass(frozen=True)
class SourceTensor:
    """One Megatron tensor of a bucket and how its HF tensors are produced from it."""

    megatron_name: str
    gather: str | None  # None (whole on the sender), "dense" (TP group pieces), "expert" (expert-TP group pieces)
    hf_names: tuple[str, ...]
    # The HF tensors tile the merged tensor in order, so the gathered pieces merge straight into the bucket.
    direct: bool
    transient_nbytes: int  # temporary memory while it is gathered / converted


@dataclass(frozen=True)
class BucketPlan:
    source_rank: int  # the global trainer rank that fills and sends it
    index: int  # its position in the push; -1 until the driver orders the plans of all ranks
    layout: BucketLayout
    sources: tuple[SourceTensor, ...]

    @property
    def transient_nbytes(self) -> int:
        return max((s.transient_nbytes for s in self.sources), default=0)

    @property
    def peak_nbytes(self) -> int:
        """What its sender holds beyond its own shard while filling it: the bucket plus the largest staging."""
        return self.layout.nbytes + self.transient_nbytes


def send_dtype(hf_name: str, param_dtype: torch.dtype, engine_dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor travels in: the engine's, except integer tensors and the fp32-kept router bias."""
    if not param_dtype.is_floating_point:
        return param_dtype
    return torch.float32 if hf_name.endswith(_FP32_SUFFIXES) else engine_dtype


def plan_rank(model: torch.nn.Module, layer_offset: int, tp_split_names: set[str], shard: ExpertShard,
              tp_sizes: tuple[int, int], place: RankPlace, bucket_bytes: int, engine_dtype: torch.dtype,
              skip: frozenset[str] = frozenset()) -> list[BucketPlan]:
    """The buckets this rank fills and sends (empty for a rank that only lends its pieces to a gather).

    `tp_sizes` = (dense TP size, expert TP size). A bucket holds whole Megatron tensors; it is closed before a
    tensor would push it past `bucket_bytes` minus the largest gather staging of this rank, so a sender never
    holds more than `bucket_bytes` beyond its shard (send buffer plus staging). A tensor too large for that travels
    alone and its bucket is larger (`BucketPlan.peak_nbytes` says by how much). HF tensors in `skip` (ones the
    engines hold no parameter for) are not sent."""
    buckets: list[BucketPlan] = []
    current: list[tuple[SourceTensor, list[tuple[str, torch.dtype, tuple[int, ...]]]]] = []
    size = 0

    def close() -> None:
        nonlocal current, size
        if current:
            entries = [e for _, es in current for e in es]
            buckets.append(BucketPlan(place.rank, -1, layout_bucket(entries), tuple(s for s, _ in current)))
        current, size = [], _CHECK_BYTES

    close()
    sources = []
    for name, param in megatron_tensors(model, layer_offset):
        expert = ".local_experts." in name
        if not (place.expert_sender if expert else place.dense_sender):
            continue
        source, entries = _source(name, param, expert, tp_split_names, shard, tp_sizes, engine_dtype, skip)
        if entries:
            sources.append((source, entries))
    # The send buffer is reused at the size of the largest bucket, so every bucket leaves room for the largest
    # staging any of this rank's tensors needs.
    staging = max((src.transient_nbytes for src, _ in sources), default=0)
    for unit in _loading_units(sources):
        nbytes = sum(_numel(shape) * dtype.itemsize + _PAD_SLACK for _, es in unit for _, dtype, shape in es)
        if current and size + nbytes + staging > bucket_bytes:
            close()
        current.extend(unit)
        size += nbytes
    close()
    return buckets


# SGLang's DeepSeek-family loader fuses q_a_proj and kv_a_proj_with_mqa into one parameter only when both arrive
# in the same load call (sglang/srt/models/deepseek_common/deepseek_weight_loader.py keeps them in a per-call
# cache); split over two buckets, neither is loaded (seen: their read-back differed). They share a bucket.
_LOADED_TOGETHER = re.compile(r"^(model\.layers\.\d+\.self_attn)\.(q_a_proj|kv_a_proj_with_mqa)\.weight$")


def _loading_units(sources: list) -> list[list]:
    """The sources in order, grouped so that tensors the engine must load together stay together: a group sits at
    the place of its last member."""
    keys = []
    for source, _entries in sources:
        matches = [_LOADED_TOGETHER.match(hf) for hf in source.hf_names]
        keys.append(next((m.group(1) for m in matches if m), None))
    last = {k: i for i, k in enumerate(keys) if k is not None}
    units, pending = [], {}
    for i, (item, key) in enumerate(zip(sources, keys)):
        if key is None:
            units.append([item])
            continue
        pending.setdefault(key, []).append(item)
        if last[key] == i:
            units.append(pending.pop(key))
    return units


def order_plans(per_rank: list[list[BucketPlan]]) -> list[BucketPlan]:
    """One global push order: the ranks' buckets interleaved (so senders fill theirs at the same time), each
    rank's in its own order, numbered 0..n-1."""
    ordered: list[BucketPlan] = []
    queues = [list(p) for p in per_rank]
    while any(queues):
        for q in queues:
            if q:
                b = q.pop(0)
                ordered.append(BucketPlan(b.source_rank, len(ordered), b.layout, b.sources))
    return ordered


def _source(name: str, param: torch.Tensor, expert: bool, tp_split_names: set[str], shard: ExpertShard,
            tp_sizes: tuple[int, int], engine_dtype: torch.dtype, skip: frozenset[str]):
    gathered = name in tp_split_names
    size = tp_sizes[1] if expert else tp_sizes[0]
    shape = list(param.shape)
    if gathered:
        dim, _stride = tp_partition(param)
        shape[dim] *= size
    full = torch.empty(shape, dtype=param.dtype, device="meta")
    everything = megatron_to_hf(name, full, shard)
    pieces = [(hf, t) for hf, t in everything if hf not in skip]
    entries = [(hf, send_dtype(hf, t.dtype, engine_dtype), tuple(t.shape)) for hf, t in pieces]
    full_nbytes = full.numel() * full.element_size()
    copies = sum(t.numel() * t.element_size() for _, t in pieces if not _is_view_of(t, full))
    direct = (gathered and len(pieces) == len(everything) and _tiles_in_order(pieces, full)
              and len({d for _, d, _ in entries}) == 1)
    if not gathered:
        transient = copies
    elif direct and gathers_in_place(param, entries[0][1]):
        transient = 0  # the pieces land in the bucket itself
    elif direct:
        transient = full_nbytes  # the pieces, merged into the bucket
    else:
        transient = 2 * full_nbytes + copies  # the pieces and the merged tensor
    source = SourceTensor(name, ("expert" if expert else "dense") if gathered else None,
                          tuple(hf for hf, _ in pieces), direct, transient)
    return source, entries


def gathers_in_place(param: torch.Tensor, send: torch.dtype) -> bool:
    """Whether the tensor-parallel pieces of `param` can be gathered straight into their place in the bucket:
    split along dim 0 without a stride (each rank's piece is one contiguous run of the full tensor) and sent in
    its own dtype."""
    return tp_partition(param) == (0, 1) and send == param.dtype


def _is_view_of(t: torch.Tensor, base: torch.Tensor) -> bool:
    return t is base or t._base is base


def _tiles_in_order(pieces: list[tuple[str, torch.Tensor]], full: torch.Tensor) -> bool:
    """Whether the HF tensors are contiguous views of `full` covering it back to back in order."""
    offset = 0
    for _, t in pieces:
        if not (_is_view_of(t, full) and t.is_contiguous() and t.storage_offset() == offset):
            return False
        offset += t.numel()
    return offset == full.numel()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
