"""Weight-sync throughput against the raw operation underneath it, measured in one run on one machine.

    python bench/weight_sync.py --preset small          # the figures docs/benchmarks.md records
    python bench/weight_sync.py --preset tiny           # fixed per-push latency dominates here

One trainer rank (Megatron, world size 1) and one SGLang engine, both from the same random checkpoint. Each push
moves the whole model (every tensor the engine holds) as the loop does after a training step:
- colocated: `trainer.weight_sync=tensor` pushes per second in bytes, divided by a plain torch copy of the same
  bytes on this machine (`dst.copy_(src)` into an already touched buffer, the faster of 1 and the default number
  of threads: the strictest plain copy);
- distributed: `trainer.weight_sync=distributed` pushes, divided by raw `torch.distributed.broadcast`s of the
  same bucket sizes between two processes over the same backend (gloo on CPU, NCCL on GPU), no SGLang involved.
Medians of `--pushes` pushes after one warm-up push each. Prints `colocated sync/memcpy: N.NNx` and
`distributed sync/broadcast: N.NNx`.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_seconds(nbytes: int, repeats: int) -> float:
    """The faster of torch's copy with one thread and with its default threads (on a shared box the second
    thread often waits for a core, which makes small copies look far slower than the memory is)."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once: what is timed is the copy, not the first-touch page faults
    default = torch.get_num_threads()
    best = []
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        best.append(_median_seconds(lambda: dst.copy_(src), repeats))
    torch.set_num_threads(default)
    return min(best)


@ray.remote(num_cpus=0)
class _Broadcaster:
    """One end of a raw broadcast group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, rank: int, port: int, sizes: list[int]):
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        self.buffers = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]

    def broadcast_all(self) -> float:
        import torch.distributed as dist

        t0 = time.perf_counter()
        for b in self.buffers:
            dist.broadcast(b, src=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def broadcast_seconds(sizes: list[int], repeats: int) -> float:
    from glm5_model.parallel import free_port

    port = free_port()
    ends = [_Broadcaster.remote(rank, port, sizes) for rank in (0, 1)]
    ray.get([e.broadcast_all.remote() for e in ends])  # warm-up (connections)
    times = [max(ray.get([e.broadcast_all.remote() for e in ends])) for _ in range(repeats)]
    for e in ends:
        ray.kill(e)
    return statistics.median(times)


def sync_seconds(sync, repeats: int, first_version: int) -> tuple[float, dict]:
    metrics = sync.push(first_version)  # warm-up
    times = []
    for v in range(first_version + 1, first_version + 1 + repeats):
        metrics = sync.push(v)
        times.append(metrics["perf/update_weights_time"])
    return statistics.median(times), metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the engine's dtype")
    args = parser.parse_args()

    from glm5_model.hf_checkpoint import make_random_checkpoint
    from rollout.engine import RolloutEngineActor
    from trainer.config import TrainerConfig
    from trainer.group import TrainerGroup
    from trainer.weight_sync.strategies import build_weight_sync

    checkpoint = make_random_checkpoint(args.preset, Path(tempfile.mkdtemp()) / args.preset, seed=0)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    engine = RolloutEngineActor.options(num_cpus=1).remote(str(checkpoint), dtype=args.dtype, max_total_tokens=4096)
    trainer = TrainerGroup(TrainerConfig(weight_sync_bucket_mb=args.bucket_mb), str(checkpoint))
    ray.get(engine.weight_version.remote())
    try:
        results = {}
        for i, mode in enumerate(("tensor", "distributed")):
            sync = build_weight_sync(dataclasses.replace(trainer.cfg, weight_sync=mode), trainer, [engine],
                                     engine_dtype=args.dtype)
            try:
                seconds, metrics = sync_seconds(sync, args.pushes, first_version=1 + 100 * i)
                sizes = [b.layout.nbytes for b in sync.plan]
            finally:
                sync.close()
            results[mode] = (seconds, metrics["perf/update_weights_bytes"], sizes)
        nbytes = results["tensor"][1]
        copy = memcpy_seconds(int(nbytes), max(args.pushes, 5))
        raw = broadcast_seconds(results["distributed"][2], args.pushes)
    finally:
        ray.get(engine.shutdown.remote(), timeout=120)
        trainer.shutdown()
        ray.shutdown()

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"preset {args.preset}, engine {args.dtype}, {nbytes / 2**20:.1f} MiB per push in "
          f"{len(results['tensor'][2])} bucket(s) of <= {args.bucket_mb:g} MiB, {where}; medians of {args.pushes}")
    tensor_s, dist_s = results["tensor"][0], results["distributed"][0]
    print(f"  colocated sync (tensor)   {tensor_s * 1e3:9.1f} ms  {nbytes / tensor_s / 1e9:7.3f} GB/s")
    print(f"  plain torch copy          {copy * 1e3:9.1f} ms  {nbytes / copy / 1e9:7.3f} GB/s")
    print(f"  distributed sync          {dist_s * 1e3:9.1f} ms  {nbytes / dist_s / 1e9:7.3f} GB/s")
    print(f"  raw broadcast, same sizes {raw * 1e3:9.1f} ms  {sum(results['distributed'][2]) / raw / 1e9:7.3f} GB/s")
    print(f"colocated sync/memcpy: {_ratio(copy / tensor_s)}x")
    print(f"distributed sync/broadcast: {_ratio((nbytes / dist_s) / (sum(results['distributed'][2]) / raw))}x")


def _ratio(r: float) -> str:
    return f"{r:.2f}" if r >= 0.01 else f"{r:.3f}"  # tiny's colocated ratio is well under 0.01


if __name__ == "__main__":
    main()
