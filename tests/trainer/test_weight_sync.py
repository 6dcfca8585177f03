"""Weight sync end to end (trainer/weight_sync): every mode at world size 1 and at TP2, EP2 and PP2 leaves every
engine parameter bit-equal to the trainer's, the engine then scores a fixed sequence as the trainer does, and no
sending rank holds more than one bucket beyond its shard.

One engine serves the whole module (a start costs ~25 s); each layout starts one trainer group and pushes in all
three modes, training a step before each push so every push carries new weights."""
from __future__ import annotations

import dataclasses
import random

import pytest
import ray
import torch

from rollout.weight_protocol import checksum
from trainer.batching import TrainItem
from trainer.config import TrainerConfig

MODES = ("tensor", "distributed", "disk")
# fp32 on CPU, SGLang's kernels vs Megatron's on identical weights: max ~4e-5, mean ~1e-5 (measured); a weight
# that did not arrive moves logprobs by 1e-2 or more.
LOGPROB_FLOOR = 1e-4


def _items(n=6, seed=0):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        prompt, response = rng.randint(3, 8), rng.randint(2, 10)
        tokens = [rng.randrange(10, 500) for _ in range(prompt + response)]
        items.append(TrainItem(tokens, prompt, rng.uniform(-1, 1), [-6.0] * response))
    return items


@pytest.fixture(scope="module")
def engine(ray_session, tiny_checkpoint):
    from rollout.engine import RolloutEngineActor

    actor = RolloutEngineActor.options(num_cpus=1).remote(str(tiny_checkpoint), seed=0, max_total_tokens=4096)
    ray.get(actor.weight_version.remote())
    yield actor
    ray.get(actor.shutdown.remote(), timeout=120)
    ray.kill(actor)


def _group(checkpoint, **layout):
    from trainer.group import TrainerGroup

    return TrainerGroup(TrainerConfig(lr=1e-3, grad_clip=0.0, **layout), str(checkpoint))


def _engine_matches_trainer(engine, trainer, version: int) -> None:
    """Independent of the sync code: the full weights gathered by the old export path, hashed here, against the
    engine's parameters read back."""
    assert ray.get(engine.weight_version.remote()) == version
    exported = dict(ray.get(trainer.export_weights()))
    request = [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in exported.items()]
    got = ray.get(engine.read_weight_checksums.remote(request))
    # The CPU engine holds the DSA indexer too (rollout/sglang_cpu/sparse_attention.py): every tensor has a place.
    assert not got["unmapped"], f"HF tensors the engine has no place for: {got['unmapped']}"
    assert not got["uncovered"], f"engine parameters not covered by the trainer's tensors: {got['uncovered']}"
    exported = {n: t for n, t in exported.items() if n not in got["unmapped"]}
    differ = [n for n, t in exported.items() if got["checksums"][n] != checksum(t)]
    assert not differ, f"weight version {version}: engine differs from the trainer in {differ[:5]}"


FIXED = _items(3, seed=99)


def _logprobs(engine, trainer) -> tuple[list[list[float]], float, float]:
    """The engine's logprobs of a fixed sequence, and their max / mean distance to the trainer's."""
    engine_lp = ray.get(engine.score.remote([it.tokens for it in FIXED], [it.prompt_len for it in FIXED]))
    diffs = [abs(a - b) for x, y in zip(engine_lp, trainer.compute_logprobs(FIXED)) for a, b in zip(x, y)]
    return engine_lp, max(diffs), sum(diffs) / len(diffs)


def _push_every_mode(engine, trainer, checkpoint, first_version: int, bucket_mb: float) -> None:
    """Trains one step, then for each mode: the engine back to the checkpoint, the new weights pushed (verified
    on), the engine's parameters compared with the trainer's, the fixed sequence scored. All three modes must
    give the very same engine logprobs; engine vs trainer must stay at the fp32 kernel floor (SGLang and Megatron
    compute differently; the same floor is there before any training, see test_world1_every_mode)."""
    from trainer.weight_sync.strategies import build_weight_sync

    trainer.train_step(_items())
    scores = {}
    for i, mode in enumerate(MODES):
        version = first_version + i
        ray.get(engine.update_weights_from_disk.remote(str(checkpoint), 0))  # so this push must change it
        cfg = dataclasses.replace(trainer.cfg, weight_sync=mode, weight_sync_bucket_mb=bucket_mb,
                                  weight_sync_verify=True)
        sync = build_weight_sync(cfg, trainer, [engine])
        try:
            metrics = sync.push(version)  # verify on: raises unless every tensor reads back equal
        finally:
            sync.close()
        assert metrics["perf/update_weights_bytes"] > 0
        if mode != "disk":
            assert metrics["perf/update_weights_buckets"] == len(sync.plan) >= 1
        _engine_matches_trainer(engine, trainer, version)
        scores[mode], worst, mean = _logprobs(engine, trainer)
        print(f"[{mode}] {metrics['perf/update_weights_buckets']:.0f} buckets "
              f"{metrics['perf/update_weights_time'] * 1e3:.0f} ms; engine vs trainer logprobs max {worst:.1e} "
              f"mean {mean:.1e}")
        assert worst <= LOGPROB_FLOOR, f"[{mode}] engine vs trainer logprobs differ by {worst:.2e}"
    assert scores["tensor"] == scores["distributed"] == scores["disk"], "the modes left different weights"


def test_world1_every_mode(engine, tiny_checkpoint):
    trainer = _group(tiny_checkpoint)
    try:
        _, worst, mean = _logprobs(engine, trainer)
        print(f"\nbefore any push (both from the checkpoint): engine vs trainer logprobs max {worst:.1e} "
              f"mean {mean:.1e}")
        _push_every_mode(engine, trainer, tiny_checkpoint, first_version=1, bucket_mb=0.25)
    finally:
        trainer.shutdown()


def _bucket(tiny_checkpoint, version: int, index: int = 0):
    """A real bucket (the checkpoint's first two layer-0 norms) in shared memory, with its check entry."""
    from glm5_model.hf_checkpoint import load_hf_state_dict
    from rollout.weight_protocol import layout_bucket, write_check

    state = load_hf_state_dict(tiny_checkpoint)
    names = ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]
    layout = layout_bucket([(n, state[n].dtype, tuple(state[n].shape)) for n in names])
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8).share_memory_()
    for e in layout.weights:
        e.view(flat).copy_(state[e.name] + 1.0)
    write_check(flat, layout, version, index)
    return layout, flat


def test_engine_refuses_a_bad_bucket_and_keeps_its_version(engine, tiny_checkpoint):
    """Tensor mode: a bucket whose bytes changed after its checksum was written, or that claims another version,
    is refused before anything is loaded; the push cannot end without it and the served version stays."""
    import torch.multiprocessing

    from trainer.weight_sync.sender import _handle

    torch.multiprocessing.set_sharing_strategy("file_system")
    served = ray.get(engine.weight_version.remote())
    layout, flat = _bucket(tiny_checkpoint, version=served + 1)
    request = [(e.name, e.dtype, e.shape) for e in layout.weights]
    before = ray.get(engine.read_weight_checksums.remote(request))["checksums"]
    ray.get(engine.begin_weight_push.remote(served + 1))
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="weight version .* received, .* expected"):
            ray.get(engine.load_bucket.remote(_handle(flat), layout, served + 2, 0))
        flat[3] ^= 0x40
        with pytest.raises(ray.exceptions.RayTaskError, match="checksum"):
            ray.get(engine.load_bucket.remote(_handle(flat), layout, served + 1, 0))
        with pytest.raises(ray.exceptions.RayTaskError, match=r"buckets \[0\] never arrived"):
            ray.get(engine.end_weight_push.remote(served + 1, 1))
    finally:
        ray.get(engine.abort_weight_push.remote())
    assert ray.get(engine.weight_version.remote()) == served
    assert ray.get(engine.read_weight_checksums.remote(request))["checksums"] == before, "the bad bucket was loaded"


@ray.remote(num_cpus=0)
def _broadcast_corrupted(layout, flat, address, port, group_name):
    """Leads a weight-update group (as a sending rank does) and broadcasts a bucket whose bytes were changed after
    its checksum was written."""
    from sglang.srt.utils import init_custom_process_group

    group = init_custom_process_group(backend="gloo", init_method=f"tcp://{address}:{port}", world_size=2, rank=0,
                                      group_name=group_name)
    flat = flat.clone()
    flat[5] ^= 0x01
    torch.distributed.broadcast(flat, src=0, group=group)
    torch.distributed.destroy_process_group(group)


def test_distributed_receive_refuses_a_corrupted_bucket(engine, tiny_checkpoint):
    """Distributed mode: SGLang's scheduler checks the broadcast bytes (rollout/weight_receiver.py) and loads
    nothing of a bucket that does not match its checksum."""
    from glm5_model.parallel import free_port

    served = ray.get(engine.weight_version.remote())
    layout, flat = _bucket(tiny_checkpoint, version=served + 1)
    request = [(e.name, e.dtype, e.shape) for e in layout.weights]
    before = ray.get(engine.read_weight_checksums.remote(request))["checksums"]
    port, name = free_port(), f"test-corrupt-{served}"
    sender = _broadcast_corrupted.remote(layout, flat, "127.0.0.1", port, name)
    ray.get(engine.join_weight_group.remote(name, "127.0.0.1", port, 1, 2, "gloo"))
    ray.get(engine.begin_weight_push.remote(served + 1))
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="refused the bucket.*checksum"):
            ray.get(engine.receive_buckets.remote([(name, layout, 0)], served + 1))
        ray.get(sender)
    finally:
        ray.get(engine.abort_weight_push.remote())
        ray.get(engine.leave_weight_group.remote(name))
    assert ray.get(engine.weight_version.remote()) == served
    assert ray.get(engine.read_weight_checksums.remote(request))["checksums"] == before, "the bad bucket was loaded"


def _measured_push(engine, trainer, version: int, bucket_mb: float) -> tuple[list, list]:
    """A tensor-mode push with every rank's allocations tracked (trainer/weight_sync/memory.py)."""
    from trainer.weight_sync.strategies import build_weight_sync

    cfg = dataclasses.replace(trainer.cfg, weight_sync="tensor", weight_sync_bucket_mb=bucket_mb)
    sync = build_weight_sync(cfg, trainer, [engine])
    ray.get(engine.begin_weight_push.remote(version))
    reports = ray.get([r.push_weights.remote(sync.plan_ref, version, engines=[engine], measure=True)
                       for r in trainer.ranks])
    ray.get(engine.end_weight_push.remote(version, len(sync.plan)))
    return sync.plan, reports


def _assert_one_bucket_beyond_shard(engine, trainer, version: int) -> None:
    """No sending rank holds more than one bucket beyond its own shard: the bytes each rank's push allocated
    (measured by tracking every torch allocation, not taken from the plan) stay within the bucket size, with a
    bucket size that fits the largest tensor and its gather staging."""
    bucket_mb = 0.75
    plan, reports = _measured_push(engine, trainer, version, bucket_mb)
    for r in reports:
        own = [b for b in plan if b.source_rank == r.rank]
        print(f"rank {r.rank}: {len(own)} buckets, {r.payload_bytes} B sent, measured peak extra "
              f"{r.peak_extra_bytes} B (bucket {bucket_mb * 2**20:.0f} B)")
        assert r.peak_extra_bytes <= bucket_mb * 2**20, f"rank {r.rank} held {r.peak_extra_bytes} B"
        if own:
            assert len(own) > 1  # so the bound is about filling buckets one after another
            assert r.peak_extra_bytes >= max(b.layout.nbytes for b in own)  # the tracker sees the send buffer
    assert len({r.rank for r in reports if r.buckets}) == 2, "both ranks should send (dense + experts of EP rank 1)"
    _engine_matches_trainer(engine, trainer, version)


def test_tp2_ep2_every_mode_and_memory_bound(engine, tiny_checkpoint):
    """TP2 + EP2 on two ranks: rank 0 sends the dense tensors (gathering rank 1's pieces) and its experts, rank 1
    lends its pieces and sends its own experts; the two interleave in one push order."""
    trainer = _group(tiny_checkpoint, world_size=2, tensor_parallel=2, expert_parallel=2, sequence_parallel=True)
    try:
        _push_every_mode(engine, trainer, tiny_checkpoint, first_version=20, bucket_mb=0.25)
        _assert_one_bucket_beyond_shard(engine, trainer, version=30)
    finally:
        trainer.shutdown()


@pytest.mark.parametrize("layout", [
    pytest.param({"tensor_parallel": 2, "sequence_parallel": True}, marks=pytest.mark.slow, id="tp2"),
    pytest.param({"expert_parallel": 2}, marks=pytest.mark.slow, id="ep2"),
    pytest.param({"pipeline_parallel": 2, "pipeline_first_stage_layers": 1, "micro_batch_size": 2}, id="pp2"),
])
def test_world2_every_mode(engine, tiny_checkpoint, layout):
    """TP2 and EP2 alone are slow-marked: the TP2 + EP2 test above covers both the gathers and a second sender."""
    trainer = _group(tiny_checkpoint, world_size=2, **layout)
    try:
        _push_every_mode(engine, trainer, tiny_checkpoint, first_version=10, bucket_mb=0.25)
    finally:
        trainer.shutdown()


@pytest.mark.slow
def test_bf16_engine_gets_weights_cast_per_bucket(ray_session, tiny_checkpoint):
    """An engine serving bf16 from an fp32 trainer: each sender casts per bucket (the router bias stays fp32), and
    every tensor the engine holds reads back as the trainer's tensor cast to that dtype, in both bucketed modes."""
    from rollout.engine import RolloutEngineActor
    from trainer.weight_sync.plan import send_dtype
    from trainer.weight_sync.strategies import build_weight_sync

    engine = RolloutEngineActor.options(num_cpus=1).remote(str(tiny_checkpoint), dtype="bfloat16", seed=0,
                                                           max_total_tokens=4096)
    trainer = _group(tiny_checkpoint)
    try:
        trainer.train_step(_items())
        exported = dict(ray.get(trainer.export_weights()))
        cast = {n: t.to(send_dtype(n, t.dtype, torch.bfloat16)) for n, t in exported.items()}
        for version, mode in enumerate(("tensor", "distributed"), start=1):
            cfg = dataclasses.replace(trainer.cfg, weight_sync=mode, weight_sync_verify=True)
            sync = build_weight_sync(cfg, trainer, [engine], engine_dtype="bfloat16")
            try:
                sync.push(version)
            finally:
                sync.close()
            request = [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in cast.items()]
            got = ray.get(engine.read_weight_checksums.remote(request))
            assert not got["uncovered"]
            held = [n for n in cast if n not in got["unmapped"]]
            assert [n for n in held if got["checksums"][n] != checksum(cast[n])] == []
            assert any(n.endswith("e_score_correction_bias") and cast[n].dtype == torch.float32 for n in held)
    finally:
        trainer.shutdown()
        ray.get(engine.shutdown.remote(), timeout=120)
        ray.kill(engine)


@ray.remote(num_cpus=0)
class _PushRecorder:
    """The push half of an engine: one push open at a time, as SGLangEngine enforces; or an engine that dies as
    a push begins (its scheduler was killed)."""

    def __init__(self, dies: bool = False):
        self.open, self.dies = None, dies

    def begin_weight_push(self, version):
        if self.dies:
            import os

            os._exit(1)
        if self.open is not None:
            raise RuntimeError(f"a push of version {self.open} is still open; end or abort it first")
        self.open = version

    def end_weight_push(self, version, buckets):
        self.open = None

    def abort_weight_push(self):
        self.open = None

    def open_push(self):
        return self.open


def test_engine_dying_as_a_push_begins_leaves_no_push_open(ray_session):
    """Found by bench/engine_faults.py: an engine killed as a push began left the other engines' pushes open, so
    the loop's retry onto the replacement failed with 'a push of version N is still open'."""
    from trainer.weight_sync.strategies import TensorSync

    survivor, dying = _PushRecorder.remote(), _PushRecorder.remote(dies=True)
    sync = object.__new__(TensorSync)  # the begin/end/abort protocol only: no trainer, no buckets
    sync.plan, sync.engines, sync._send = [], [survivor, dying], lambda version: []
    with pytest.raises(ray.exceptions.RayActorError):
        sync._push(57)
    assert ray.get(survivor.open_push.remote()) is None
    sync.engines = [survivor, _PushRecorder.remote()]  # the pool's replacement joined: the retry goes through
    assert sync._push(57)[:2] == (0, 0)
