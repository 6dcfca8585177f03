"""The rollout manager with scripted engines (tests/rollout/scripted_engine.py): each loop mode through the same
calls the trainer loop makes, APRIL stragglers aborted and resumed, a checkpoint taken mid-generation resumed by
a fresh manager with the same trained groups as an uninterrupted run, several engines with group affinity, and an
engine failure surfacing to the loop."""
from __future__ import annotations

import dataclasses
import time

import pytest

from rewards import RewardSpec, RunnerSettings
from rollout.config import LoopConfig, RolloutConfig, validate_rollout_config
from rollout.data import PromptRow
from rollout.data.config import DataConfig
from rollout.manager import EngineSpec, RolloutManager

from .push_retry import push_to_pool
from .scripted_engine import ScriptedEngineActor

ROWS = [PromptRow(i, [{"role": "user", "content": f"question {i}"}]) for i in range(40)]


def _manager(ray, checkpoint, engines=1, rows=ROWS, engine_kwargs=None, **overrides):
    loop_keys = {"mode", "sync_interval", "pause_mode", "batch_timeout_s"}
    r = RolloutConfig(**{"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 12,
                         **{k: v for k, v in overrides.items() if k not in loop_keys}})
    # A stuck step fails with a message rather than at pytest-timeout (its signal landing inside a ray.get is
    # the likeliest reason a CI run hung in every Ray test after one timed out).
    loop = LoopConfig(**{"batch_timeout_s": 120.0, **{k: v for k, v in overrides.items() if k in loop_keys}})
    validate_rollout_config(r, loop)
    handles = [ScriptedEngineActor.remote(seed=k, **(engine_kwargs or {})) for k in range(engines)]
    m = RolloutManager(r, loop, DataConfig(shuffle=False), rows, EngineSpec(str(checkpoint), engines),
                       [RewardSpec("char_fraction")], RunnerSettings(), engine_handles=handles)
    return m, handles


def _train_loop(ray, m, handles, steps, start=0, train_s=0.02):
    """What trainer/main.py does, with a sleep for the training step and a version bump for the push."""
    batches = []
    for step in range(start, start + steps):
        batch = m.next_batch(step)
        batches.append(batch)
        time.sleep(train_s)
        m.pause_for_weights()
        ray.get([e.update_weights_from_tensors.remote([], step + 1) for e in handles])
        m.on_weights(step + 1)
    return batches


def _check_batches(batches, max_staleness):
    seen = set()
    for b in batches:
        assert len(b.groups) == 2 and all(len(g) == 2 for g in b.groups)
        for g in b.groups:
            assert len({s.group_id for s in g}) == 1 and g[0].group_id not in seen
            seen.add(g[0].group_id)
            for s in g:
                assert s.finished and s.reward is not None and s.response_length > 0
                assert all(b.step - v <= max_staleness for v in s.response_versions)
        assert b.metrics["rollout/staleness/max"] == max(b.token_ages)
    return seen


@pytest.mark.parametrize("mode, pause_mode", [("sync", "retract"), ("one_step_off", "retract"),
                                              ("async", "retract"), ("async", "abort")])
def test_loop_modes(ray_session, tiny_checkpoint, mode, pause_mode):
    m, handles = _manager(ray_session, tiny_checkpoint, mode=mode, pause_mode=pause_mode, max_staleness=2,
                          partial_rollout=True)
    m.start()
    try:
        batches = _train_loop(ray_session, m, handles, steps=5)
    finally:
        m.shutdown()
    seen = _check_batches(batches, max_staleness=2)
    assert seen == set(range(10)), "admission order: groups 0..9 in order"
    stale = [b.metrics["rollout/staleness/max"] for b in batches]
    if mode == "sync":
        assert stale == [0] * 5
    else:  # generation ran ahead of the trainer
        assert max(stale) >= 1
    assert all(0.0 <= b.metrics["rollout/engine_idle_frac"] <= 1.0 for b in batches)


def test_april_aborts_stragglers_and_resumes_them(ray_session, tiny_checkpoint):
    """Over-sampling 2 extra groups with a long tail: once 2 groups are done the rest is aborted; partial
    samples resume next step from their tokens (older tokens tagged with the older version)."""
    m, handles = _manager(ray_session, tiny_checkpoint, partial_rollout=True, over_sample_prompts=2,
                          max_new_tokens=40, engine_kwargs={"tick_s": 0.01, "long_tail": True})
    m.start()
    try:
        batches = _train_loop(ray_session, m, handles, steps=6)
        flow = m.metrics()
    finally:
        m.shutdown()
    _check_batches(batches, max_staleness=1)
    assert flow["rollout/flow/total_aborted_requests"] > 0
    assert flow["rollout/flow/total_resumed_requests"] > 0
    mixed = [s for b in batches for s in b.samples if len(set(s.response_versions)) > 1]
    assert mixed, "no trained sample was resumed across a weight version"


def test_checkpoint_mid_generation_resumes_the_same_groups(ray_session, tiny_checkpoint):
    """state() while async generation runs ahead: in-flight requests are aborted with their tokens kept, and a
    new manager loaded from the state trains exactly the groups (and prompts) an uninterrupted run trains."""
    def run(split):
        m, handles = _manager(ray_session, tiny_checkpoint, mode="async", max_staleness=2,
                              engine_kwargs={"tick_s": 0.01})
        m.start()
        try:
            first = _train_loop(ray_session, m, handles, steps=split)
            # Generation runs ahead of the trainer (on a loaded machine the dispatch thread may need a moment
            # after the last push to admit the next groups).
            deadline = time.monotonic() + 30
            while not m.metrics()["rollout/flow/live_groups"] and time.monotonic() < deadline:
                time.sleep(0.01)
            state = m.state()
            if split == 6:
                return first, state
        finally:
            m.shutdown()
        m2, handles2 = _manager(ray_session, tiny_checkpoint, mode="async", max_staleness=2)
        m2.load_state(state)
        ray_session.get([e.update_weights_from_tensors.remote([], split) for e in handles2])
        m2.start()
        try:
            return first + _train_loop(ray_session, m2, handles2, steps=6 - split, start=split), state
        finally:
            m2.shutdown()

    whole, _ = run(6)
    resumed, state = run(3)
    partial = [s for g in state["flow"]["groups"] for s in g if s["response_ids"] and s["status"] == "aborted"]
    assert state["flow"]["groups"], "the checkpoint held no generated-ahead groups"
    def rows(batches):
        return [(g[0].group_id, g[0].metadata["row"]) for b in batches for g in b.groups]
    assert rows(resumed) == rows(whole) == [(i, i) for i in range(12)]
    print(f"\ncheckpoint held {len(state['flow']['groups'])} live groups, {len(partial)} partial samples")


def test_groups_stay_on_one_engine_and_load_spreads(ray_session, tiny_checkpoint):
    m, handles = _manager(ray_session, tiny_checkpoint, engines=2, mode="async", max_staleness=1)
    m.start()
    try:
        _train_loop(ray_session, m, handles, steps=4)
    finally:
        m.shutdown()
    served = [ray_session.get(e.served_rids.remote()) for e in handles]
    group_engines: dict[str, set[int]] = {}
    for k, rids in enumerate(served):
        for rid in rids:
            group_engines.setdefault(rid.split("/")[0], set()).add(k)
    assert all(len(ks) == 1 for ks in group_engines.values()), "a group's samples went to two engines"
    assert all(rids for rids in served), "one engine got no work"


def test_engine_failure_reaches_the_loop(ray_session, tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    first_token = tok.apply_chat_template(ROWS[0].messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)[-1]
    m, _ = _manager(ray_session, tiny_checkpoint, engine_kwargs={"fail_on_token": first_token})
    m.start()
    try:
        with pytest.raises(RuntimeError, match="scripted engine failure"):
            m.next_batch(0)
    finally:
        m.shutdown()


def _driver_with_faults(ray, m, handles, steps, faults: dict, push_faults: dict | None = None,
                        until=None, max_steps: int = 0):
    """The trainer loop's calls, answering EnginesJoining like trainer/runtime.py does (push the trainer's
    weights to the replacements), with `faults[step]` run right before the batch of `step` is requested and
    `push_faults[step]` right before its weight push (the engines paused). Runs `steps` steps, then more (up to
    `max_steps`) until `until()` holds."""
    from rollout.manager import EnginesJoining

    batches, joined, step = [], 0, 0
    while step < steps or (until is not None and step < max_steps and not until()):
        if step in faults:
            faults[step]()
        while True:
            out = m.next_batch(step)
            if not isinstance(out, EnginesJoining):
                break
            ray.get([e.update_weights_from_tensors.remote([], step) for e in out.handles])
            m.on_engines_joined(out.handles)
            joined += len(out.handles)
        batches.append(out)
        m.pause_for_weights()
        if step in (push_faults or {}):
            push_faults[step]()
        push_to_pool(m, lambda e, v=step + 1: e.update_weights_from_tensors.remote([], v), attempts=100,
                     retry_after_s=0.1)
        m.on_weights(step + 1)
        step += 1
    return batches, joined


@pytest.mark.parametrize("fault", ["dies", "hangs", "hangs_paused_for_the_push"])
def test_failed_engine_is_replaced_and_no_request_is_lost(ray_session, tiny_checkpoint, fault):
    """Two engines; one dies (its actor is killed) or hangs (stops generating and answering health checks and
    weight updates, as a SIGSTOPped scheduler does) mid-rollout, or hangs while paused for a weight push (which
    then waits on it): its requests finish on the other, every batch is whole with no sample twice, and a
    replacement starts, gets the weights and serves."""
    started = []

    def factory(i):
        h = ScriptedEngineActor.remote(seed=100 + i, tick_s=0.01)
        started.append(h)
        return h

    # A 3 s check timeout: a healthy engine's check must not miss it on a loaded 2-core CI machine (checks run
    # while paused for a push too), and a hung one is still caught within a step or two.
    m, handles = _manager(ray_session, tiny_checkpoint, engines=2, mode="async", max_staleness=1,
                          max_new_tokens=40, health_interval_s=0.2, health_timeout_s=3.0,
                          engine_kwargs={"tick_s": 0.02})
    m.pool.factory = factory
    victim = handles[0]

    def act():
        deadline = time.monotonic() + 30
        while not ray_session.get(victim.in_flight.remote()):  # strike mid-rollout
            assert time.monotonic() < deadline, "the victim never got work"
            time.sleep(0.005)
        if fault == "dies":
            ray_session.kill(victim)
        else:
            ray_session.get(victim.hang.remote())

    held = []

    def hang_under_push():  # the requests it holds (if any: the bound may have stopped admission) move on resume
        held.append(ray_session.get(victim.in_flight.remote()))
        ray_session.get(victim.hang.remote())
    faults, push_faults = ({}, {2: hang_under_push}) if fault == "hangs_paused_for_the_push" else ({2: act}, {})

    def replacement_served():
        return bool(started) and bool(ray_session.get(started[0].served_rids.remote()))

    m.start()
    try:
        # On a loaded 2-core machine the hung engine's check timeout, its kill and the replacement's actor start
        # can outlast the fault's remaining steps: the run goes on (rows for 20 steps) until the replacement served.
        batches, joined = _driver_with_faults(ray_session, m, handles, steps=8, faults=faults,
                                              push_faults=push_faults, until=replacement_served, max_steps=18)
        pool = m.pool_metrics()
        served_by_new = ray_session.get(started[0].served_rids.remote()) if started else []
    finally:
        m.shutdown()
    seen = _check_batches(batches, max_staleness=1)
    assert seen == set(range(2 * len(batches)))
    assert pool["rollout/pool/engine_failures"] == 1 and pool["rollout/pool/engine_restarts"] == 1
    assert pool["rollout/pool/requeued_requests"] >= (min(held[0], 1) if held else 1)
    # It joins through EnginesJoining when the loop waits on a batch, or else with the next regular push.
    assert joined <= 1 and served_by_new, f"the replacement never served: joined {joined}, {len(batches)} steps"
    assert pool["rollout/pool/active_engines"] == 2


def test_openai_endpoint_onto_the_pool(ray_session, tiny_checkpoint, monkeypatch):
    """The OpenAI-compatible endpoint: bound to loopback, refuses requests without the key, renders chat
    messages with the checkpoint's template and answers from the engines."""
    import httpx

    monkeypatch.setenv("SLIPSTREAM_TEST_KEY", "sekrit")
    m, _ = _manager(ray_session, tiny_checkpoint, openai_port=0, openai_api_key_env="SLIPSTREAM_TEST_KEY")
    try:
        url = m.openai_url()
        assert url.startswith("http://127.0.0.1:")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 5}
        assert httpx.post(f"{url}/chat/completions", json=body, timeout=30).status_code == 401
        ok = httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": "Bearer sekrit"},
                        timeout=30)
        assert ok.status_code == 200, ok.text
        reply = ok.json()
        assert [c["message"]["role"] for c in reply["choices"]] == ["assistant", "assistant"]
        assert reply["usage"]["completion_tokens"] == 4  # the scripted engine answers 2 tokens per request
        bad = httpx.post(f"{url}/completions", json={"prompt": 7}, headers={"Authorization": "Bearer sekrit"},
                         timeout=30)
        assert bad.status_code == 400 and "prompt" in bad.json()["error"]["message"]
    finally:
        m.shutdown()


def test_rows_are_scored_by_their_task_reward_and_reported_per_task(ray_session, tiny_checkpoint):
    """reward.by_task / a task family's reward scores its rows; the rest get the run's reward; batch and eval
    metrics are split by task, with the factuality reward's batch metrics per task."""
    from rollout.generation import SamplingSettings

    rows = [PromptRow(i, [{"role": "user", "content": f"Capital of Zorbia {i}?"}], label="Quell",
                      task="facts") if i % 2 else PromptRow(i, [{"role": "user", "content": f"q {i}"}])
            for i in range(8)]
    r = RolloutConfig(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=8)
    handles = [ScriptedEngineActor.remote(seed=0)]
    m = RolloutManager(r, LoopConfig(), DataConfig(shuffle=False), rows, EngineSpec(str(tiny_checkpoint), 1),
                       [RewardSpec("char_fraction")], RunnerSettings(), engine_handles=handles,
                       task_rewards={"facts": [RewardSpec("factuality")]})
    m.start()
    try:
        batch = m.next_batch(0)
        evaluated = m.evaluate(rows[:4], SamplingSettings(4))
    finally:
        m.shutdown()
    for s in batch.samples:
        own = "factuality" if s.metadata["task"] == "facts" else "char_fraction"
        assert f"{own}/score" in s.reward_components and len({k.split("/")[0] for k in s.reward_components}) == 1
    metrics = batch.metrics
    assert metrics["rollout/facts/samples"] == 4.0 and "rollout/facts/hallucination_rate" in metrics
    assert metrics["rollout/facts/raw_reward"] <= 0.0  # random tokens never name Quell
    assert "eval/facts/raw_reward" in evaluated and "eval/facts/abstention_rate" in evaluated
    # Each group's distinct responses were scored once (RunnerSettings.dedupe); no cache was configured.
    distinct = len({(s.group_id, s.response_text) for s in batch.samples})
    assert (metrics["rollout/reward_calls"], metrics["rollout/reward_cache_hits"]) == (distinct, 0.0)


def test_a_stuck_step_says_what_the_batch_waits_on(ray_session, tiny_checkpoint):
    """loop.batch_timeout_s: a batch that does not come fails the step with the flow's state, down to the
    oldest live group's samples (a batch in admission order waits on it)."""
    m, _ = _manager(ray_session, tiny_checkpoint, batch_timeout_s=1.0, engine_kwargs={"tick_s": 60.0})
    m.start()
    try:
        with pytest.raises(TimeoutError, match=r"no batch for step 0 within 1s .*oldest live group 0: "
                                               r"pending in flight, pending in flight\)"):
            m.next_batch(0)
    finally:
        m.shutdown()


def test_a_push_hands_the_next_batch_to_the_engines_at_once(ray_session, tiny_checkpoint, monkeypatch):
    """on_weights dispatches what its version admits itself: engines drained for a push do not sit idle until the
    dispatch loop's next look (made 5 s here, as is each engine's wait for a first result)."""
    monkeypatch.setattr(RolloutManager, "DISPATCH_POLL_S", 5.0)
    m, (engine,) = _manager(ray_session, tiny_checkpoint)
    m.pool.settings = dataclasses.replace(m.pool.settings, collect_timeout_s=5.0)
    m.start()
    try:
        m.next_batch(0)
        m.pause_for_weights()  # sync: batch 1 is admitted only by version 1, so nothing runs now
        ray_session.get(engine.update_weights_from_tensors.remote([], 1))
        served = len(ray_session.get(engine.served_rids.remote()))
        t0 = time.monotonic()
        m.on_weights(1)
        while len(ray_session.get(engine.served_rids.remote())) == served and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert time.monotonic() - t0 < 1.0
        assert len(m.next_batch(1).groups) == 2
    finally:
        m.shutdown()
