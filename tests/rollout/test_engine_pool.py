"""The engine pool with scripted engines (tests/rollout/scripted_engine.py): races between routing a request and
an engine failing, which the manager tests only reach by chance on a loaded machine."""
from __future__ import annotations

import time

from rollout.engine_pool import EnginePool, PoolSettings
from rollout.protocol import EngineRequest

from .scripted_engine import ScriptedEngineActor


def _collect_all(pool: EnginePool, rids: set[str], timeout_s: float = 30.0) -> dict:
    out, deadline = {}, time.monotonic() + timeout_s
    while set(out) != rids:
        assert time.monotonic() < deadline, f"never came back: {sorted(rids - set(out))}"
        out.update((r.rid, r) for r in pool.collect(0.05))
    return out


def _pool_with_a_joining_replacement(**settings) -> tuple[EnginePool, list]:
    """Two scripted engines; the first fails and its replacement (the returned list's one engine) becomes ready
    and waits, joining, for weights."""
    started = []

    def factory(i):
        started.append(ScriptedEngineActor.remote(seed=100 + i))
        return started[-1]

    pool = EnginePool([ScriptedEngineActor.remote(seed=0), ScriptedEngineActor.remote(seed=1)],
                      PoolSettings(health_interval_s=60.0, **settings), factory)
    try:
        pool._fail(pool.slots[0], "scripted failure")
        deadline = time.monotonic() + 60
        while not pool.joining():
            assert time.monotonic() < deadline, "the replacement never started"
            pool.collect(0.05)
    except BaseException:
        pool.shutdown()  # the tests shut it down only once they have it
        raise
    return pool, started


def test_requests_routed_to_an_engine_that_fails_before_they_are_sent_go_to_another(ray_session):
    """submit() routes under the pool's lock and sends after it: an engine failed in between (by the health check
    on the dispatch thread, or a pause on the loop's thread) must not swallow what was routed to it."""
    engines = [ScriptedEngineActor.remote(seed=k, tick_s=0.005) for k in range(2)]
    pool = EnginePool(engines, PoolSettings(health_interval_s=60.0))
    requests = [(f"g{k}", EngineRequest(f"g{k}/0", [1, 2, 3], {"max_new_tokens": 4})) for k in range(4)]
    try:
        with pool._lock:
            per_slot = pool._route(requests)
        victim = next(iter(per_slot))  # the engine the first requests were routed to fails now
        pool._fail(pool.slots[victim], "failed between routing and sending")
        pool._send(per_slot)
        results = _collect_all(pool, {req.rid for _key, req in requests})
        survivor = engines[1 - victim]
        assert sorted(ray_session.get(survivor.served_rids.remote())) == sorted(results)
        assert all(r.finish_reason != "abort" and r.output_ids for r in results.values())
        assert not pool.slots[victim].inflight, "a request was left on the failed engine"
    finally:
        pool.shutdown()


def test_a_replacement_that_missed_the_push_does_not_serve_until_it_has_the_weights(ray_session):
    """A push goes to the engines listed when it starts; a replacement that becomes ready after that (the
    dispatch thread's collect() moves it to joining) missed it. on_weights(version) must not make it serve the
    weights it was started with: its tokens would be past the staleness bound, regenerated, and sent to it again."""
    pool, started = _pool_with_a_joining_replacement()
    try:
        ray_session.get(pool.slots[1].handle.update_weights_from_tensors.remote([], 5))  # the push's list: [survivor]
        pool.on_weights(version=5)
        assert pool.joining() == started, "a replacement that missed version 5 was made to serve"
        ray_session.get(started[0].update_weights_from_tensors.remote([], 5))  # the next push reaches it
        pool.on_weights(version=5)
        assert not pool.joining() and [s.state for s in pool.slots] == ["active", "active"]
    finally:
        pool.shutdown()


def test_a_replacement_that_hangs_before_the_push_does_not_hold_up_on_weights(ray_session):
    """on_weights asks each joining replacement for its weight version; one that stopped answering stays joining
    (its health check fails it later) and the push's other engines are not held up past the health timeout."""
    pool, started = _pool_with_a_joining_replacement(health_timeout_s=2.0)
    try:
        ray_session.get(started[0].hang.remote())
        t0 = time.monotonic()
        pool.on_weights(version=1)
        assert time.monotonic() - t0 < 10.0, "a hung replacement held on_weights"
        assert pool.joining() == started
    finally:
        pool.shutdown()


def test_a_pool_shut_down_starts_no_replacement(ray_session):
    """The manager's shutdown gives its dispatch thread 30 s to stop; a health check already under way may still
    fail an engine after the pool has shut down, and must not start an engine nobody will stop."""
    started = []
    pool = EnginePool([ScriptedEngineActor.remote()], factory=lambda i: started.append(i))
    slot = pool.slots[0]
    pool.shutdown()
    pool._fail(slot, "its health check did not answer within 1s")  # the late check's verdict
    assert started == [] and pool.counters["engine_failures"] == 1
