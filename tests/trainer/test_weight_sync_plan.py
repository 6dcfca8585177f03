"""The push wire format (rollout/weight_protocol.py) and the bucket planning rules (trainer/weight_sync/plan.py)
without engines or ranks: layouts, checks that catch a bad bucket, the dtype each tensor travels in, the tensors
that must share a bucket, one push order."""
from __future__ import annotations

import pytest
import torch

from rollout.weight_protocol import (ALGORITHMS, CHECK_NAME, PAD_NAME, checksum, layout_bucket, verify_check,
                                     write_check)
from trainer.weight_sync.plan import BucketPlan, SourceTensor, _loading_units, order_plans, send_dtype


def _filled(tensors: dict[str, torch.Tensor], version=3, index=1):
    layout = layout_bucket([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for e in layout.weights:
        e.view(flat).copy_(tensors[e.name])
    write_check(flat, layout, version, index)
    return layout, flat


def test_layout_aligns_every_entry_and_ends_with_the_check():
    tensors = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.arange(5, dtype=torch.float32),
               "c": torch.ones(1, dtype=torch.uint8), "d": torch.arange(2, dtype=torch.int64)}
    layout, flat = _filled(tensors)
    assert [e.name for e in layout.weights] == list(tensors)
    assert layout.entries[-1].name == CHECK_NAME and any(e.name == PAD_NAME for e in layout.entries)
    offset = 0
    for e in layout.entries:  # back to back, as SGLang's receive rebuilds them from names, dtypes and shapes
        assert e.offset == offset and e.offset % e.torch_dtype.itemsize == 0
        offset += e.nbytes
    for e in layout.weights:
        assert torch.equal(e.view(flat), tensors[e.name])
    verify_check(flat, layout.payload_nbytes, layout.entries[-1].view(flat), version=3, index=1)


def test_check_refuses_a_corrupted_reordered_or_misnumbered_bucket():
    layout, flat = _filled({"x": torch.randn(300), "y": torch.randn(200)})
    check = layout.entries[-1]
    with pytest.raises(ValueError, match="weight version 3 received, 4 expected"):
        verify_check(flat, layout.payload_nbytes, check.view(flat), version=4)
    with pytest.raises(ValueError, match="where bucket 2 was expected"):
        verify_check(flat, layout.payload_nbytes, check.view(flat), index=2)
    with pytest.raises(ValueError, match="disagree on the layout"):
        verify_check(flat, layout.payload_nbytes - 4, check.view(flat))
    flipped = flat.clone()
    flipped[17] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        verify_check(flipped, layout.payload_nbytes, check.view(flipped))
    swapped = flat.clone()  # two 512-byte blocks of x exchanged
    swapped[:512], swapped[512:1024] = flat[512:1024].clone(), flat[:512].clone()
    with pytest.raises(ValueError, match="checksum"):
        verify_check(swapped, layout.payload_nbytes, check.view(swapped))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_checksum_depends_on_every_byte_and_their_order(algorithm):
    x = torch.randn(1000)
    base = checksum(x, algorithm)
    assert checksum(x.clone(), algorithm) == base
    assert checksum(x.to(torch.bfloat16), algorithm) != checksum(x.to(torch.bfloat16).float(), algorithm)
    for i in (0, 333, 3999):  # first, middle and last byte (the last lies in the zero-padded tail)
        y = x.clone()
        y.view(torch.uint8)[i] ^= 0x10
        assert checksum(y, algorithm) != base
    assert checksum(torch.cat([x[128:256], x[:128], x[256:]]), algorithm) != base  # 512-byte blocks swapped
    assert checksum(x[:-1], algorithm) != base
    assert checksum(x[1:], algorithm) == checksum(x[1:].clone(), algorithm)  # unaligned views are handled


def test_tensors_travel_in_the_engine_dtype_except_the_router_bias():
    assert send_dtype("model.layers.1.mlp.gate.weight", torch.float32, torch.bfloat16) == torch.bfloat16
    assert send_dtype("model.layers.1.mlp.gate.e_score_correction_bias", torch.float32,
                      torch.bfloat16) == torch.float32
    assert send_dtype("some.int.buffer", torch.int64, torch.bfloat16) == torch.int64


def _source(*hf_names):
    return SourceTensor("meg." + hf_names[0], None, tuple(hf_names), False, 0)


def test_fused_projections_share_a_loading_unit():
    """SGLang fuses q_a_proj and kv_a_proj_with_mqa only within one load call: they must not be split."""
    p = "model.layers.2.self_attn."
    order = [_source(p + "q_a_proj.weight"), _source(p + "q_b_proj.weight"),
             _source(p + "kv_a_proj_with_mqa.weight"), _source(p + "o_proj.weight")]
    units = _loading_units([(s, []) for s in order])
    names = [[s.hf_names[0].removeprefix(p) for s, _ in u] for u in units]
    assert names == [["q_b_proj.weight"], ["q_a_proj.weight", "kv_a_proj_with_mqa.weight"], ["o_proj.weight"]]


def test_order_interleaves_senders_and_numbers_buckets():
    layout = layout_bucket([("w", torch.float32, (1,))])
    per_rank = [[BucketPlan(0, -1, layout, ()) for _ in range(3)], [], [BucketPlan(2, -1, layout, ())]]
    ordered = order_plans(per_rank)
    assert [(b.source_rank, b.index) for b in ordered] == [(0, 0), (2, 1), (0, 2), (0, 3)]


def _open_and_sum(handle: bytes, out) -> None:
    import pickle

    out.put(int(pickle.loads(handle).sum()))


def test_one_bucket_handle_per_engine_opens_in_every_engine():
    """Each engine gets its own handle of the send buffer: a shared CPU storage's pickle takes one reference and
    opening it gives one back, so one handle opened by two engines let the second find the file gone."""
    import multiprocessing as mp

    import torch

    from trainer.weight_sync.sender import _handle

    torch.multiprocessing.set_sharing_strategy("file_system")
    flat = torch.arange(64, dtype=torch.uint8)
    flat.share_memory_()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    for _engine in range(3):  # as sender.push does: a fresh handle for each engine
        p = ctx.Process(target=_open_and_sum, args=(_handle(flat), out))
        p.start()
        p.join(60)
        assert p.exitcode == 0
    assert [out.get(timeout=10) for _ in range(3)] == [int(flat.sum())] * 3
