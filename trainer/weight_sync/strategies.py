"""Driver side: one `WeightSync` per run, chosen by `trainer.weight_sync`; `push(version)` moves the trainer's
current weights into every engine and returns the push's metrics.

- tensor (colocated): each sending rank hands its buckets to the engines as shared-memory / CUDA-IPC handles; the
  engines load them through SGLang's flattened-bucket tensor update. No full-model gather, nothing through the
  driver (it only passes the plan and waits).
- distributed: every engine joins one weight-update group per sending rank (that rank is its rank 0; gloo on CPU,
  NCCL on GPU) and receives the buckets by broadcast, in one global order.
- disk: rank 0 gathers and writes an HF checkpoint, the engines reload it (as before this package existed).

A push is versioned (every bucket carries the version, the engine serves it only once all buckets arrived and
verified) and, with `trainer.weight_sync_verify`, checked end to end: every HF tensor's checksum is read back from
every engine's parameters and compared with what its owning rank sent, and every engine parameter must be
covered by those tensors.
"""
from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path

import ray

from trainer.config import TrainerConfig
from trainer.group import TrainerGroup
from trainer.weight_sync.plan import BucketPlan, order_plans

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    pass


class WeightSync:
    """Pushes the trainer's weights into the engines; `push(version)` returns perf/update_weights_* metrics."""

    name = ""

    def __init__(self, cfg: TrainerConfig, trainer: TrainerGroup, engines: list):
        self.cfg, self.trainer, self.engines = cfg, trainer, engines

    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        payload, buckets, (checksums, algorithm) = self._push(version)
        seconds = time.perf_counter() - t0
        metrics = {"perf/update_weights_time": seconds, "perf/update_weights_bytes": float(payload),
                   "perf/update_weights_gbps": payload / max(seconds, 1e-9) / 1e9,
                   "perf/update_weights_buckets": float(buckets)}
        if self.cfg.weight_sync_verify:
            t1 = time.perf_counter()
            self._verify(version, checksums, algorithm)
            metrics["perf/update_weights_verify_time"] = time.perf_counter() - t1
        return metrics

    def close(self) -> None:
        """Releases what the strategy holds (process groups); engines and ranks stay up."""

    def _push(self, version: int) -> tuple[int, int, tuple[dict, str | None]]:
        """Returns (payload bytes, buckets, ({hf name: (checksum, dtype, shape)} when verifying, its algorithm))."""
        raise NotImplementedError

    def _verify(self, version: int, sent: dict, algorithm: str | None) -> None:
        request = [(name, dtype, tuple(shape)) for name, (_c, dtype, shape) in sorted(sent.items())]
        for i, (engine, served) in enumerate(zip(self.engines, ray.get([e.weight_version.remote() for e in
                                                                        self.engines]))):
            if served != version:
                raise WeightSyncError(f"engine {i} serves weight version {served} after a push of {version}")
            got = ray.get(engine.read_weight_checksums.remote(request, algorithm=algorithm))
            wrong = sorted(n for n, (c, _d, _s) in sent.items() if got["checksums"].get(n) not in (None, c))
            problems = {"differ": wrong, "not found in the engine": got["unmapped"],
                        "engine parameters not covered": sorted(got["uncovered"])}
            problems = {k: v for k, v in problems.items() if v}
            if problems:
                raise WeightSyncError(f"engine {i}, weight version {version}: after the push its weights are not "
                                      f"the trainer's: {_summary(problems)}")
        log.info("weight version %d verified on %d engine(s): %d tensors bit-equal", version, len(self.engines),
                 len(sent))


class _BucketedSync(WeightSync):
    """Shared by tensor and distributed: a global bucket plan made once, begin/end around every push."""

    def __init__(self, cfg: TrainerConfig, trainer: TrainerGroup, engines: list, engine_dtype: str):
        super().__init__(cfg, trainer, engines)
        self.plan: list[BucketPlan] = _global_plan(cfg, trainer, engine_dtype, engines)
        self.plan_ref = ray.put(self.plan)
        self.senders = sorted({b.source_rank for b in self.plan})

    def _push(self, version: int) -> tuple[int, int, dict]:
        begins = [e.begin_weight_push.remote(version) for e in self.engines]
        try:
            ray.get(begins)
            reports = self._send(version)
            ray.get([e.end_weight_push.remote(version, len(self.plan)) for e in self.engines])
        except BaseException:
            # An engine that died as its push began leaves the others' pushes open; the retry onto the pool's
            # replacement would then find them open. Every begin has finished before any abort is sent.
            ray.wait(begins, num_returns=len(begins), timeout=60)
            for e in self.engines:
                try:
                    ray.get(e.abort_weight_push.remote(), timeout=60)
                except Exception:  # noqa: BLE001 - the original failure is the one to report
                    log.exception("could not close a failed push on an engine")
            raise
        return (sum(r.payload_bytes for r in reports), sum(r.buckets for r in reports), _checksums(reports))

    def _send(self, version: int) -> list:
        raise NotImplementedError


class TensorSync(_BucketedSync):
    name = "tensor"

    def _send(self, version: int) -> list:
        return ray.get([r.push_weights.remote(self.plan_ref, version, engines=self.engines,
                                              verify=self.cfg.weight_sync_verify) for r in self.trainer.ranks])


class DistributedSync(_BucketedSync):
    name = "distributed"

    def __init__(self, cfg: TrainerConfig, trainer: TrainerGroup, engines: list, engine_dtype: str):
        super().__init__(cfg, trainer, engines, engine_dtype)
        tag = uuid.uuid4().hex[:8]
        self.groups = {s: f"slipstream-weights-{tag}-r{s}" for s in self.senders}
        world = 1 + len(engines)
        for s, name in self.groups.items():  # one rendezvous at a time: each blocks until all members arrived
            rank = trainer.ranks[s]
            address, port, backend = ray.get(rank.weight_group_address.remote())
            ray.get([rank.join_weight_group.remote(name, address, port, world, backend)]
                    + [e.join_weight_group.remote(name, address, port, 1 + i, world, backend)
                       for i, e in enumerate(engines)])
        self.engine_plan_ref = ray.put([(self.groups[b.source_rank], b.layout, b.index) for b in self.plan])

    def _send(self, version: int) -> list:
        receiving = [e.receive_buckets.remote(self.engine_plan_ref, version) for e in self.engines]
        sending = [r.push_weights.remote(self.plan_ref, version, group_name=self.groups.get(i),
                                         verify=self.cfg.weight_sync_verify)
                   for i, r in enumerate(self.trainer.ranks)]
        reports = ray.get(sending)
        ray.get(receiving)
        return reports

    def close(self) -> None:
        for s, name in self.groups.items():
            ray.get([self.trainer.ranks[s].leave_weight_group.remote(name)]
                    + [e.leave_weight_group.remote(name) for e in self.engines])
        self.groups = {}


class DiskSync(WeightSync):
    """Rank 0 writes an HF checkpoint (a gather of the full model); every engine reloads it."""

    name = "disk"

    def __init__(self, cfg: TrainerConfig, trainer: TrainerGroup, engines: list, weights_dir: Path | None,
                 engine_dtype: str):
        super().__init__(cfg, trainer, engines)
        self.weights_dir = Path(weights_dir) if weights_dir is not None else Path(
            tempfile.mkdtemp(prefix="slipstream-weights-"))
        self._checksum_plan = None
        self._engine_dtype = engine_dtype

    def _push(self, version: int) -> tuple[int, int, tuple[dict, str | None]]:
        path = self.trainer.save_hf_checkpoint(str(self.weights_dir / f"v{version}"))
        ray.get([e.update_weights_from_disk.remote(path, version) for e in self.engines])
        payload = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        checksums = self._trainer_checksums(version) if self.cfg.weight_sync_verify else ({}, None)
        return payload, 0, checksums

    def _trainer_checksums(self, version: int) -> tuple[dict, str | None]:
        """What the owning ranks hold, in the engine's dtype (the buckets filled, not sent)."""
        if self._checksum_plan is None:
            self._checksum_plan = ray.put(_global_plan(self.cfg, self.trainer, self._engine_dtype, self.engines))
        return _checksums(ray.get([r.push_weights.remote(self._checksum_plan, version, verify=True)
                                   for r in self.trainer.ranks]))


def build_weight_sync(cfg: TrainerConfig, trainer: TrainerGroup, engines: list, *, engine_dtype: str = "float32",
                      weights_dir: Path | None = None) -> WeightSync:
    """The strategy `cfg.weight_sync` names. `engine_dtype` is what the engines serve (each sending rank casts
    per bucket); `weights_dir` is where disk mode writes its checkpoints (a temporary directory if None)."""
    if cfg.weight_sync == "tensor":
        return TensorSync(cfg, trainer, engines, engine_dtype)
    if cfg.weight_sync == "distributed":
        return DistributedSync(cfg, trainer, engines, engine_dtype)
    if cfg.weight_sync == "disk":
        return DiskSync(cfg, trainer, engines, weights_dir, engine_dtype)
    raise ValueError(f"trainer.weight_sync: unknown strategy {cfg.weight_sync!r}")


def _global_plan(cfg: TrainerConfig, trainer: TrainerGroup, engine_dtype: str, engines: list) -> list[BucketPlan]:
    """Every rank's buckets in one push order, leaving out HF tensors the engines hold no parameter for (e.g. the
    DSA indexer of a DSA model an engine serves as dense MLA): sending them would only cost time."""
    bucket_bytes = int(cfg.weight_sync_bucket_mb * 2**20)
    plan = order_plans(ray.get([r.weight_sync_plan.remote(bucket_bytes, engine_dtype) for r in trainer.ranks]))
    request = [(e.name, e.dtype, e.shape) for b in plan for e in b.layout.weights]
    held_by_none = set.intersection(*(set(ray.get(e.read_weight_checksums.remote(request, hash=False))["unmapped"])
                                      for e in engines)) if engines else set()
    if not held_by_none:
        return plan
    log.info("weight sync leaves out %d tensors no engine holds (e.g. %s)", len(held_by_none),
             sorted(held_by_none)[:3])
    skip = frozenset(held_by_none)
    return order_plans(ray.get([r.weight_sync_plan.remote(bucket_bytes, engine_dtype, skip) for r in trainer.ranks]))


def _checksums(reports: list) -> tuple[dict, str | None]:
    sums = {k: v for r in reports for k, v in (r.checksums or {}).items()}
    return sums, reports[0].algorithm if reports else None


def _summary(problems: dict[str, list]) -> str:
    return "; ".join(f"{len(v)} {k} (e.g. {', '.join(map(str, v[:3]))})" for k, v in problems.items())
