"""The engine pool with real SGLang engines on CPU: kill -9 of one engine's scheduler mid-rollout, then SIGSTOP of
the other's. Each time the rollout completes with every sample exactly once, the failed engine's requests finish
elsewhere, and a replacement starts, gets the current weights and version, and serves."""
from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

from rewards import RewardSpec, RunnerSettings
from rollout.config import LoopConfig, RolloutConfig, validate_rollout_config
from rollout.data import PromptRow
from rollout.data.config import DataConfig
from rollout.manager import EngineSpec, EnginesJoining, RolloutManager

from .push_retry import push_to_pool

ROWS = [PromptRow(i, [{"role": "user", "content": f"Tell me a long story, number {i}."}]) for i in range(30)]


def _scheduler_pid(ray, handle) -> int:
    for pid in ray.get(handle.process_ids.remote()):
        if "scheduler" in " ".join(psutil.Process(pid).cmdline()):
            return pid
    raise AssertionError("no sglang::scheduler among the engine's processes")


def _strike_mid_rollout(ray, handle, sig) -> int:
    deadline = time.monotonic() + 120
    while not ray.get(handle.in_flight.remote()):
        assert time.monotonic() < deadline, "the engine never got work"
        time.sleep(0.01)
    time.sleep(0.3)
    pid = _scheduler_pid(ray, handle)
    os.kill(pid, sig)
    return pid


def test_scheduler_killed_then_another_stopped(ray_session, tiny_checkpoint):
    ray = ray_session
    r = RolloutConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=160, num_engines=2,
                      health_interval_s=1.0, health_timeout_s=30.0)
    loop = LoopConfig(mode="async", batch_timeout_s=300.0)  # a stuck step fails with a message, not a hang
    validate_rollout_config(r, loop)
    m = RolloutManager(r, loop, DataConfig(shuffle=False), ROWS, EngineSpec(str(tiny_checkpoint), 2, cpus=0.5),
                       [RewardSpec("char_fraction")], RunnerSettings())
    m.ready()
    first = list(m.engine_handles())
    faults = {1: (first[0], signal.SIGKILL), 3: (first[1], signal.SIGSTOP)}
    m.start()
    batches, joined_versions, struck_pids = [], [], []

    def join(handles, version):
        ray.get([e.update_weights_from_disk.remote(str(tiny_checkpoint), version) for e in handles])
        m.on_engines_joined(handles)
        joined_versions.extend(ray.get([e.weight_version.remote() for e in handles]))
    try:
        for step in range(6):
            if step in faults:
                victim, sig = faults[step]
                struck_pids.append(_strike_mid_rollout(ray, victim, sig))
            while isinstance(out := m.next_batch(step), EnginesJoining):
                join(out.handles, step)
            batches.append(out)
            m.pause_for_weights()
            push_to_pool(m, lambda e: e.update_weights_from_disk.remote(str(tiny_checkpoint), step + 1),
                         attempts=60, retry_after_s=1.0, timeout_s=300)
            m.on_weights(step + 1)
        # The last steps can outrun the second replacement's start (one engine serves them): it joins as the
        # next batch would bring it in.
        deadline = time.monotonic() + 300
        while len(m.engine_handles()) < 2:  # serving or joining
            assert time.monotonic() < deadline, "the second replacement never started"
            time.sleep(0.5)
        if m.pool.joining():
            join(m.pool.joining(), 6)
        pool = m.pool_metrics()
        final = m.engine_handles()
        versions = ray.get([e.weight_version.remote() for e in final])
    finally:
        m.shutdown()
        for pid in struck_pids:  # a stopped scheduler the pool did not kill would outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    keys = [(s.group_id, s.index_in_group) for b in batches for s in b.samples]
    assert len(keys) == 6 * 4 and len(set(keys)) == len(keys), "a sample was lost or trained twice"
    assert [g[0].group_id for b in batches for g in b.groups] == list(range(12))
    assert pool["rollout/pool/engine_failures"] == 2 and pool["rollout/pool/engine_restarts"] == 2
    assert pool["rollout/pool/requeued_requests"] >= 2
    assert len(final) == 2 and not {e._actor_id for e in final} & {e._actor_id for e in first}
    assert versions == [6, 6], "the replacements do not serve the current version"
    assert joined_versions, "no replacement joined through the loop's push"
    print(f"\npool after two faults: {pool}; joined at versions {joined_versions}")
