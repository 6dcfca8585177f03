"""What trainer/runtime.py's sync_weights does when an engine dies under a weight push (or the pool fails it
meanwhile), for the rollout tests that drive the manager without a trainer: once the pool has replaced the
engine, push to the engines it now has."""
from __future__ import annotations

import time

import ray


def push_to_pool(manager, push, *, attempts: int, retry_after_s: float, timeout_s: float | None = None) -> None:
    """`push(engine)` -> an ObjectRef, for every engine the manager has, until one round finishes on all of them.
    A push that waits `timeout_s` is a test failure (an engine the pool should have failed), not a hang."""
    for _attempt in range(attempts):
        try:
            ray.get([push(e) for e in manager.engine_handles()], timeout=timeout_s)
            return
        except ray.exceptions.RayActorError:
            time.sleep(retry_after_s)
        except ray.exceptions.GetTimeoutError:
            raise AssertionError(f"a weight push waited {timeout_s}s on an engine the pool did not fail") from None
    raise AssertionError("the pool never replaced the engine that failed under the push")
