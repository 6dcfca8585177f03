"""Many rollout engines behind one object: requests routed by load with affinity, results streamed as each
finishes, and engines that die or hang replaced without losing a request.

The rollout manager is the only caller (rollout/manager.py). A request carries an affinity key (its prompt
group, or a multi-turn trajectory): requests with the same key go to the same engine while it lives, so the
group's shared prompt prefix is cached once. Engines are `rollout.engine.RolloutEngineActor` handles (or anything
with the same methods: tests/rollout/scripted_engine.py).

Fault tolerance. An engine is failed when a call to it dies (its actor is gone), when its health check reports a
problem (a SGLang process gone or stopped, a one-token request that does not finish), or when the health check
itself does not answer within `health_timeout_s`. Its in-flight requests are requeued on the other engines (or
held until one serves) -- a request is finished by exactly one engine, since the failed one is killed before its
requests move -- and a replacement is started. The replacement serves only once it has the current weights:
until then it is `joining()`, and the next weight push (or the manager's call for one) brings it in.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import ray

from rollout.protocol import EngineRequest, EngineResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSettings:
    health_interval_s: float = 5.0   # how often each serving engine is checked
    health_timeout_s: float = 60.0   # a check slower than this fails the engine
    max_restarts: int = 20           # replacements over the run; past it a failed engine is not replaced
    collect_timeout_s: float = 0.2   # how long each engine's collect() waits for a first result


@dataclass
class _Slot:
    handle: object
    state: str                        # starting | joining | active | dead
    started: object = None            # ObjectRef of weight_version() while starting
    inflight: dict[str, tuple[object, EngineRequest]] = field(default_factory=dict)  # rid -> (key, request)
    collect_ref: object = None
    health_ref: object = None
    health_sent: float = 0.0
    last_health: float = 0.0
    idle_since: float | None = None
    idle_s: float = 0.0


class EnginePool:
    def __init__(self, handles: list, settings: PoolSettings = PoolSettings(), factory=None):
        """`handles`: engines already started with the weights the run begins with (they serve at once);
        `factory(i)` starts a replacement engine (its i-th); None: failed engines are not replaced."""
        if not handles:
            raise ValueError("an engine pool needs at least one engine")
        self.settings, self.factory = settings, factory
        now = time.monotonic()
        self.slots = [_Slot(h, "active", idle_since=now) for h in handles]
        self.size = len(handles)
        self._lock = threading.RLock()
        self._affinity: dict[object, int] = {}
        self._pending: list[tuple[object, EngineRequest]] = []  # no engine serves right now
        self._orphans: list[EngineResult] = []  # held requests aborted before reaching an engine
        self._started = len(handles)
        self._closed = False  # shut down: a failure seen by a late health check starts no replacement
        self.counters = {"engine_restarts": 0, "requeued_requests": 0, "engine_failures": 0}
        self._degraded_s, self._degraded_since = 0.0, None

    # ------------------------------------------------------------------ requests
    def submit(self, requests: list[tuple[object, EngineRequest]]) -> None:
        """Starts each (affinity key, request) on an engine; returns once every engine holds its requests."""
        with self._lock:
            per_slot = self._route(requests)
        self._send(per_slot)

    def collect(self, timeout_s: float = 0.05) -> list[EngineResult]:
        """Results that finished since the last call, waiting up to `timeout_s`; runs the health checks and
        brings started replacements to `joining`."""
        with self._lock:
            refs = {}
            for slot in self.slots:
                if slot.state == "active":
                    if slot.collect_ref is None:
                        slot.collect_ref = slot.handle.collect.remote(self.settings.collect_timeout_s)
                    refs[slot.collect_ref] = slot
        with self._lock:
            results, self._orphans = self._orphans, []
        if refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout_s)
            for ref in ready:
                slot = refs[ref]
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._fail(slot, f"its actor died ({type(exc).__name__})")
                    continue
                with self._lock:
                    slot.collect_ref = None
                    for res in out:
                        slot.inflight.pop(res.rid, None)
                    if not slot.inflight and slot.idle_since is None:
                        slot.idle_since = time.monotonic()
                results.extend(out)
        else:
            time.sleep(timeout_s)
        self._check_health()
        self._check_started()
        return results

    def forget(self, key) -> None:
        """The key's requests are all done (its group was trained or dropped): free its affinity."""
        with self._lock:
            self._affinity.pop(key, None)

    def generate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """Blocking generation (evaluation): spread over the serving engines; a request whose engine fails is
        retried on another."""
        out: dict[str, EngineResult] = {}
        todo = list(requests)
        while todo:
            with self._lock:
                active = [s for s in self.slots if s.state == "active"]
            if not active:
                raise RuntimeError("no engine serves: cannot generate")
            calls = [(s, todo[k::len(active)]) for k, s in enumerate(active) if todo[k::len(active)]]
            refs = [(s, batch, s.handle.generate.remote(batch)) for s, batch in calls]
            todo = []
            for slot, batch, ref in refs:
                try:
                    out.update((r.rid, r) for r in ray.get(ref))
                except ray.exceptions.RayActorError:
                    self._fail(slot, "its actor died during generate()")
                    todo.extend(batch)
        return [out[r.rid] for r in requests]

    # ------------------------------------------------------------------ control
    def abort_all(self) -> None:
        """Every engine aborts what it runs (results come out of collect() as aborted, with their tokens), and
        requests held for want of an engine come back as aborted with no tokens."""
        with self._lock:
            slots = [s for s in self.slots if s.state == "active"]
            held, self._pending = self._pending, []
        self._each(slots, "abort_all")
        with self._lock:  # never reached an engine: nothing generated
            self._orphans += [EngineResult(req.rid, [], [], [], "abort") for _key, req in held]

    def pause(self, mode: str) -> None:
        with self._lock:
            slots = [s for s in self.slots if s.state == "active"]
        self._each(slots, "pause", mode)

    def resume(self) -> None:
        with self._lock:
            slots = [s for s in self.slots if s.state == "active"]
        self._each(slots, "resume")

    def serving_handles(self) -> list:
        """The engines a weight push must reach: serving ones and replacements waiting for weights."""
        with self._lock:
            return [s.handle for s in self.slots if s.state in ("active", "joining")]

    def joining(self) -> list:
        with self._lock:
            return [s.handle for s in self.slots if s.state == "joining"]

    def on_weights(self, handles: list | None = None, version: int | None = None) -> None:
        """A push reached `handles`, or (None) every engine it was sent to: replacements among them start
        serving, and requests held for want of an engine go to them. With handles None, a replacement serves only
        once it reports `version`: one that became ready after the push's list of engines was taken missed the
        push, and serving older weights it would generate tokens past the staleness bound until the next push."""
        if handles is None:
            with self._lock:
                joining = [s.handle for s in self.slots if s.state == "joining"]
            handles = [h for h, v in zip(joining, self._versions(joining)) if v == version]
        with self._lock:
            ids = {_id(h) for h in handles}
            for s in self.slots:
                if s.state == "joining" and _id(s.handle) in ids:
                    s.state, s.idle_since = "active", time.monotonic()
                    log.info("replacement engine joined the pool")
            held, self._pending = self._pending, []
            per_slot = self._route(held)
            self._update_degraded()
        self._send(per_slot)

    def _versions(self, handles: list) -> list[int | None]:
        """Each engine's weight version; None for one that died or did not answer within the health timeout (it
        stays joining, and its next health check fails it): a hung replacement must not hold up the push."""
        refs = [h.weight_version.remote() for h in handles]
        deadline = time.monotonic() + self.settings.health_timeout_s
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append(None)
        return out

    def metrics(self) -> dict[str, float]:
        with self._lock:
            now = time.monotonic()
            busy = [s for s in self.slots if s.state == "active"]
            idle = sum(s.idle_s + (now - s.idle_since if s.idle_since is not None else 0.0) for s in busy)
            for s in busy:
                s.idle_s, s.idle_since = 0.0, (now if s.idle_since is not None else None)
            degraded = self._degraded_s + (now - self._degraded_since if self._degraded_since else 0.0)
            return {**{f"rollout/pool/{k}": float(v) for k, v in self.counters.items()},
                    "rollout/pool/active_engines": float(len(busy)),
                    "rollout/pool/held_requests": float(len(self._pending)),
                    "rollout/pool/time_without_full_pool_s": degraded,
                    "rollout/pool/_idle_engine_s": idle}

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            slots = [s for s in self.slots if s.state != "dead"]
        for s in slots:
            try:
                ray.get(s.handle.shutdown.remote(), timeout=120)
            except Exception:  # noqa: BLE001 - a dead or hung engine: kill it instead
                ray.kill(s.handle)

    # ------------------------------------------------------------------ internals
    def _route(self, requests: list[tuple[object, EngineRequest]]) -> dict[int, list[tuple[object, EngineRequest]]]:
        """Engine index -> requests, by affinity, else the least loaded serving engine (called under the lock);
        requests no engine can take now are held."""
        per_slot: dict[int, list] = {}
        active = [k for k, s in enumerate(self.slots) if s.state == "active"]
        for key, req in requests:
            if not active:
                self._pending.append((key, req))
                continue
            k = self._affinity.get(key)
            if k is None or self.slots[k].state != "active":
                k = min(active, key=lambda i: len(self.slots[i].inflight) + len(per_slot.get(i, [])))
                self._affinity[key] = k
            per_slot.setdefault(k, []).append((key, req))
        return per_slot

    def _send(self, per_slot: dict[int, list[tuple[object, EngineRequest]]]) -> None:
        refs = []
        with self._lock:
            # Routing and sending are two lock sections: an engine failed in between (by another thread's health
            # check or control call) has already requeued what it held, so what was routed to it is routed again
            # here; a request added to a dead slot's in-flight set would never come back.
            stray = [req for k, batch in per_slot.items() if self.slots[k].state != "active" for req in batch]
            per_slot = {k: batch for k, batch in per_slot.items() if self.slots[k].state == "active"}
            for k, batch in self._route(stray).items():
                per_slot.setdefault(k, []).extend(batch)
            for k, batch in per_slot.items():
                slot = self.slots[k]
                now = time.monotonic()
                if slot.idle_since is not None:
                    slot.idle_s += now - slot.idle_since
                    slot.idle_since = None
                for key, req in batch:
                    slot.inflight[req.rid] = (key, req)
                refs.append((slot, slot.handle.submit.remote([req for _, req in batch])))
        for slot, ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                self._fail(slot, "its actor died during submit()")

    def _each(self, slots: list[_Slot], method: str, *args) -> None:
        refs = [(s, getattr(s.handle, method).remote(*args)) for s in slots]
        for slot, ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                self._fail(slot, f"its actor died during {method}()")

    def _check_health(self) -> None:
        now = time.monotonic()
        failed = []
        with self._lock:
            # Checks go on while the pool is paused for a weight push: an engine whose scheduler stops or dies then
            # would otherwise hold the push forever (the engine's check skips its request while paused).
            for s in self.slots:
                if s.state != "active":
                    continue
                if s.health_ref is None:
                    if now - s.last_health >= self.settings.health_interval_s:
                        s.health_ref = s.handle.health.remote(self.settings.health_timeout_s / 2)
                        s.health_sent = now
                    continue
                done, _ = ray.wait([s.health_ref], timeout=0)
                if done:
                    try:
                        report = ray.get(s.health_ref)
                        problem = None if report.ok else report.reason
                    except ray.exceptions.RayActorError:
                        problem = "its actor died"
                    s.health_ref, s.last_health = None, now
                    if problem:
                        failed.append((s, problem))
                elif now - s.health_sent > self.settings.health_timeout_s:
                    failed.append((s, f"its health check did not answer within {self.settings.health_timeout_s:.0f}s"))
        for s, problem in failed:
            self._fail(s, problem)

    def _check_started(self) -> None:
        with self._lock:
            starting = [s for s in self.slots if s.state == "starting"]
        for s in starting:
            done, _ = ray.wait([s.started], timeout=0)
            if not done:
                continue
            try:
                ray.get(s.started)
            except ray.exceptions.RayError as exc:
                self._fail(s, f"its start failed: {exc}")
                continue
            with self._lock:
                s.state = "joining"
            log.info("replacement engine started; it serves after the next weight push")

    def _fail(self, slot: _Slot, reason: str) -> None:
        """Kills the engine, requeues its requests and starts a replacement (once)."""
        with self._lock:
            if slot.state == "dead":
                return
            was = slot.state
            slot.state = "dead"
            requeue = list(slot.inflight.values())
            slot.inflight.clear()
            self.counters["engine_failures"] += 1
            self._update_degraded()
        log.warning("engine failed (%s, was %s): %s; requeuing %d requests", _id(slot.handle), was, reason,
                    len(requeue))
        try:
            ray.get(slot.handle.kill.remote(), timeout=10)  # its SGLang processes first: they may be stopped
        except Exception:  # noqa: BLE001 - the actor may be gone already
            pass
        ray.kill(slot.handle, no_restart=True)
        with self._lock:
            for key, _req in requeue:
                self._affinity.pop(key, None)
            self.counters["requeued_requests"] += len(requeue)
            per_slot = self._route(requeue)
            replace = (self.factory is not None and not self._closed
                       and self.counters["engine_restarts"] < self.settings.max_restarts)
            if replace:
                self.counters["engine_restarts"] += 1
                handle = self.factory(self._started)
                self._started += 1
                self.slots[self.slots.index(slot)] = _Slot(handle, "starting", started=handle.weight_version.remote())
        self._send(per_slot)

    def _update_degraded(self) -> None:
        """Tracks time with fewer serving engines than the pool's size (called under the lock)."""
        full = sum(s.state == "active" for s in self.slots) >= self.size
        now = time.monotonic()
        if full and self._degraded_since is not None:
            self._degraded_s += now - self._degraded_since
            self._degraded_since = None
        elif not full and self._degraded_since is None:
            self._degraded_since = now


def _id(handle) -> str:
    actor_id = getattr(handle, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else str(id(handle))
