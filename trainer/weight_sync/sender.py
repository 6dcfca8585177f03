"""Rank side, sending: fills the buckets of a push from this rank's live parameters and sends them.

Every rank walks the same global bucket order (trainer/weight_sync/plan.py). For a bucket it sends, a rank gathers
the tensor-parallel pieces it needs from its group, casts into one flat send buffer (reused across buckets and
pushes: the one bucket it holds beyond its shard), writes the check entry and sends:
- tensor (colocated): the buffer as a shared-memory handle (CUDA IPC on a GPU) to every engine, which maps it
  and loads it through SGLang's flattened-bucket tensor update; nothing passes through the driver;
- distributed: one broadcast of the buffer over the weight-update group this rank leads (rank 0), which every
  engine joined.
For a bucket another rank sends, a rank only lends its pieces to that rank's gathers (or does nothing).
Walking one order everywhere is what keeps the gathers and broadcasts of different senders from waiting on each
other in a cycle: the earliest unfinished bucket always has all its participants at it.
"""
from __future__ import annotations

import atexit
import io
import socket
import time
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from glm5_model.convert import ExpertShard, megatron_tensors, megatron_to_hf, merge_tp_into, tp_merge, tp_partition
from rollout.weight_protocol import checksum, default_algorithm, write_check
from trainer.weight_sync.memory import AllocationTracker
from trainer.weight_sync.plan import BucketPlan, RankPlace, gathers_in_place, plan_rank


@dataclass(frozen=True)
class SendReport:
    """What one rank did in one push."""

    rank: int
    payload_bytes: int
    buckets: int
    seconds: float
    peak_extra_bytes: int | None  # measured (AllocationTracker) when asked, else None
    # Per HF tensor sent: (checksum, dtype, shape), when the push is verified, by `algorithm`.
    checksums: dict[str, tuple[int, str, tuple[int, ...]]] | None
    algorithm: str


class WeightSender:
    def __init__(self, model: torch.nn.Module, layer_offset: int, tp_split_names: set[str], shard: ExpertShard,
                 tp_sizes: tuple[int, int], place: RankPlace, tp_group, expert_tp_group, device: torch.device):
        self.model, self.layer_offset, self.tp_split_names = model, layer_offset, tp_split_names
        self.shard, self.tp_sizes, self.place, self.device = shard, tp_sizes, place, device
        self._groups = {"dense": tp_group, "expert": expert_tp_group}
        self._members = {"dense": place.tp_group, "expert": place.expert_tp_group}
        self._buffer: torch.Tensor | None = None
        self._shm_name: str | None = None
        self._update_groups: dict[str, object] = {}
        if device.type == "cpu":
            # Engines open the send buffer by name (see rollout/engine.py: fd passing fails between unrelated
            # processes).
            import torch.multiprocessing

            torch.multiprocessing.set_sharing_strategy("file_system")
            atexit.register(self.close)

    @classmethod
    def for_megatron_rank(cls, model: torch.nn.Module, layer_offset: int, tp_split_names: set[str],
                          shard: ExpertShard, tp_sizes: tuple[int, int], device: torch.device) -> "WeightSender":
        """The sender of this process's Megatron rank (parallel state initialised)."""
        from megatron.core import parallel_state as ps

        tp_group, expert_tp_group = ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group()
        place = RankPlace(
            rank=dist.get_rank(),
            dense_sender=ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0,
            expert_sender=ps.get_expert_tensor_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0,
            tp_group=tuple(dist.get_process_group_ranks(tp_group)),
            expert_tp_group=tuple(dist.get_process_group_ranks(expert_tp_group)))
        return cls(model, layer_offset, tp_split_names, shard, tp_sizes, place, tp_group, expert_tp_group, device)

    # ------------------------------------------------------------------ planning and groups
    def plan(self, bucket_bytes: int, engine_dtype: torch.dtype, skip: frozenset[str] = frozenset()
             ) -> list[BucketPlan]:
        return plan_rank(self.model, self.layer_offset, self.tp_split_names, self.shard, self.tp_sizes, self.place,
                         bucket_bytes, engine_dtype, skip)

    def group_address(self) -> tuple[str, int, str]:
        """This host's address, a free port on it and the backend (gloo on CPU, NCCL on GPU), for a
        weight-update group this rank will lead."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port, "nccl" if self.device.type == "cuda" else "gloo"

    def join_group(self, group_name: str, address: str, port: int, world_size: int, backend: str) -> None:
        """Creates (as its rank 0) the weight-update group the engines join with init_weights_update_group.
        SGLang's own helper on both ends, so the two sides agree on the rendezvous and rank mapping."""
        from sglang.srt.utils import init_custom_process_group

        self._update_groups[group_name] = init_custom_process_group(
            backend=backend, init_method=f"tcp://{address}:{port}", world_size=world_size, rank=0,
            group_name=group_name)

    def leave_group(self, group_name: str) -> None:
        group = self._update_groups.pop(group_name, None)
        if group is not None:
            dist.destroy_process_group(group)

    # ------------------------------------------------------------------ pushing
    @torch.no_grad()
    def push(self, plan: list[BucketPlan], version: int, *, engines: list | None = None,
             group_name: str | None = None, verify: bool = False, measure: bool = False) -> SendReport:
        """Fills and sends this rank's buckets of `plan` (to `engines` by handle, or over `group_name` by
        broadcast; with neither, only fills them: for checksums) and lends its pieces to the other senders'
        gathers."""
        if engines is not None and group_name is not None:
            raise ValueError("push sends to engines (tensor mode) or over a group (distributed mode), not both")
        tracker = AllocationTracker() if measure else None
        own = [b.layout.nbytes for b in plan if b.source_rank == self.place.rank]
        if own:
            self._send_buffer(max(own))  # (re)sized before measuring: it is counted whole below
        params = dict(megatron_tensors(self.model, self.layer_offset))
        t0 = time.perf_counter()
        sent = payload = 0
        sums: dict[str, tuple[int, str, tuple[int, ...]]] | None = {} if verify else None
        if tracker is not None:
            tracker.__enter__()
        try:
            for bucket in plan:
                if bucket.source_rank != self.place.rank:
                    self._lend_pieces(bucket, params)
                    continue
                flat = self._fill(bucket, params)
                write_check(flat, bucket.layout, version, bucket.index)
                if sums is not None:
                    sums.update({e.name: (checksum(e.view(flat)), e.dtype, e.shape)
                                 for e in bucket.layout.weights})
                if engines is not None:
                    # One handle per engine: pickling a shared CPU storage takes one reference that opening it
                    # gives back, so a handle shared by two engines dropped the count to zero and the second
                    # engine found the shared-memory file gone (seen with two engines).
                    ray.get([e.load_bucket.remote(_handle(flat), bucket.layout, version, bucket.index)
                             for e in engines])
                elif group_name is not None:
                    dist.broadcast(flat, src=0, group=self._update_groups[group_name])
                sent += 1
                payload += bucket.layout.payload_nbytes
        finally:
            if tracker is not None:
                tracker.__exit__(None, None, None)
        held = self._buffer.numel() if own else 0
        peak = None if tracker is None else held + tracker.peak
        return SendReport(self.place.rank, payload, sent, time.perf_counter() - t0, peak, sums,
                          default_algorithm(torch.empty(0, device=self.device)))

    def _send_buffer(self, nbytes: int) -> torch.Tensor:
        """A view of the reusable send buffer, grown to the largest bucket this rank sends."""
        if self._buffer is None or self._buffer.numel() < nbytes:
            self.close()
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            if self.device.type == "cpu":
                buffer.share_memory_()
                # Its name in /dev/shm. torch's shm manager would unlink it once every process that opened it let
                # go, but engines and ranks are killed at shutdown, and the file then outlives them all (seen:
                # 825 MB of leftovers after a day of test runs). The sender unlinks it itself in close().
                self._shm_name = buffer.untyped_storage()._share_filename_cpu_()[1].decode()
            self._buffer = buffer
        return self._buffer[:nbytes]

    def close(self) -> None:
        """Drops the send buffer and its shared-memory name (mappings the engines hold stay valid)."""
        self._buffer = None
        name, self._shm_name = self._shm_name, None
        if name is not None:
            import _posixshmem

            try:
                _posixshmem.shm_unlink(name)
            except FileNotFoundError:
                pass

    def _fill(self, bucket: BucketPlan, params: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = self._send_buffer(bucket.layout.nbytes)
        by_name = {e.name: e for e in bucket.layout.entries}
        for source in bucket.sources:
            param = params[source.megatron_name]  # the Parameter itself: it carries the partition attributes
            full = param.detach()
            if source.gather is not None:
                if source.direct:  # the HF tensors tile the merged tensor: merge straight into the bucket
                    first, last = by_name[source.hf_names[0]], by_name[source.hf_names[-1]]
                    shape = list(param.shape)
                    dim, stride = tp_partition(param)
                    shape[dim] *= len(self._members[source.gather])
                    region = flat[first.offset:last.offset + last.nbytes].view(first.torch_dtype).view(shape)
                    if gathers_in_place(param, first.torch_dtype):
                        self._gather(source.gather, full, into=list(region.chunk(len(self._members[source.gather]))))
                    else:
                        merge_tp_into(self._gather(source.gather, full), dim, stride, region)
                    continue
                full = tp_merge(self._gather(source.gather, full), param)
            for hf_name, tensor in megatron_to_hf(source.megatron_name, full, self.shard):
                if hf_name in by_name:  # (tensors the engines do not hold were left out of the plan)
                    by_name[hf_name].view(flat).copy_(tensor)
        return flat

    def _gather(self, kind: str, param: torch.Tensor, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """This rank's tensor-parallel group's pieces of `param` (in rank order), received into `into` if given."""
        parts = into if into is not None else [torch.empty_like(param) for _ in self._members[kind]]
        dist.gather(param.contiguous(), parts, dst=self.place.rank, group=self._groups[kind])
        return parts

    def _lend_pieces(self, bucket: BucketPlan, params: dict[str, torch.Tensor]) -> None:
        for source in bucket.sources:
            if source.gather is not None and bucket.source_rank in self._members[source.gather]:
                param = params[source.megatron_name].detach()
                dist.gather(param.contiguous(), None, dst=bucket.source_rank, group=self._groups[source.gather])


def _handle(flat: torch.Tensor) -> bytes:
    """The buffer pickled as a shared-memory (CPU) or CUDA-IPC handle: the receiver maps it, no copy is made."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump(flat)
    return buf.getvalue()
