"""APRIL partial rollouts: the driver against a scripted engine (exact timing, fast) and against a real SGLang
engine on the tiny checkpoint (aborts, partial tokens/logprobs/versions, resumption across a weight-version bump).
The config fields and the trainer loop with partial_rollout on are tested in tests/trainer/test_run_loop.py."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from rollout.april import generate_april
from rollout.buffer import RolloutBuffer, RolloutBufferActor
from rollout.generation import SamplingSettings
from rollout.sample import Sample, SampleStatus, sample_from_dict

GROUP = 2


def _groups(first_id: int, budgets: list[int | None], seed: int = 0) -> list[list[Sample]]:
    """One group per budget (None: the settings' max_new_tokens), prompts of random token ids 10..499."""
    g = torch.Generator().manual_seed(seed + first_id)
    out = []
    for i, budget in enumerate(budgets):
        prompt = torch.randint(10, 500, (8,), generator=g).tolist()
        out.append([Sample(prompt_ids=prompt, group_id=first_id + i, index_in_group=k, max_new_tokens=budget)
                    for k in range(GROUP)])
    return out


class _Fresh:
    """new_groups callable over a fixed list of groups; records what it was asked for."""

    def __init__(self, groups: list[list[Sample]]):
        self.groups, self.asked = list(groups), []

    def __call__(self, n: int) -> list[list[Sample]]:
        self.asked.append(n)
        out, self.groups = self.groups[:n], self.groups[n:]
        return out


def _by_id(samples: list[Sample]) -> dict[tuple[int, int], Sample]:
    return {(s.group_id, s.index_in_group): s for s in samples}


# ---------------------------------------------------------------------------------------------- scripted engine
class ScriptedEngine:
    """Every running request gains one token per tick (a batching scheduler); a request ends at its budget.
    An abort that comes before generate() starts is dropped, as SGLang drops one for an unregistered rid."""

    def __init__(self, tick_s: float = 0.002, version: int = 0):
        self.tick_s, self.version = tick_s, version
        self._lock, self._finished, self._abort, self._running = threading.Lock(), set(), False, False

    def generate(self, requests):
        if any(r["input_ids"][0] == -1 for r in requests):
            raise RuntimeError("engine failure")
        with self._lock:
            self._finished, self._abort, self._running = set(), False, True
        outs = [[] for _ in requests]
        while not self._abort and len(self._finished) < len(requests):
            time.sleep(self.tick_s)
            for r, out in zip(requests, outs):
                if len(out) < r["sampling_params"]["max_new_tokens"]:
                    out.append(len(r["input_ids"]) + len(out))  # token = its position: checks the resume input
                    if len(out) == r["sampling_params"]["max_new_tokens"]:
                        with self._lock:
                            self._finished.add(r["rid"])
        with self._lock:
            self._running = False
        return [{"output_ids": out, "output_logprobs": [-0.25] * len(out), "text": "",
                 "finish_reason": "length" if r["rid"] in self._finished else "abort", "weight_version": self.version}
                for r, out in zip(requests, outs)]

    def finished_rids(self):
        with self._lock:
            return sorted(self._finished)

    def abort(self, rid=None):
        with self._lock:
            if self._running:
                self._abort = True

    def set_version(self, version):
        self.version = version


@pytest.fixture(scope="module")
def scripted(ray_session):
    actor = ray_session.remote(max_concurrency=4)(ScriptedEngine)
    return [actor.options(num_cpus=0).remote(), actor.options(num_cpus=0).remote()]


SCRIPTED = SamplingSettings(max_new_tokens=5)


def test_scripted_stragglers_stashed_then_resumed(scripted, ray_session):
    buffer = RolloutBuffer(max_staleness=1)
    fresh = _Fresh(_groups(0, [None, None, 400, 400, None]))
    res = generate_april(scripted, buffer, fresh, SCRIPTED, target_groups=2, over_sample_groups=2, version=0)
    assert fresh.asked == [4]
    assert sorted({s.group_id for s in res.samples}) == [0, 1]
    assert all(s.status == SampleStatus.TRUNCATED and s.response_length == 5 for s in res.samples)
    assert res.metrics["groups_in_play"] == 4 and res.metrics["aborted_samples"] == 4
    partial = {(s.group_id, s.index_in_group): s for g in buffer.state_dict()["groups"] for s in map(sample_from_dict, g)}
    assert sorted(partial) == [(g, k) for g in (2, 3) for k in range(GROUP)]
    assert all(s.status == SampleStatus.ABORTED and 0 < s.response_length < 400 for s in partial.values())

    ray_session.get([e.set_version.remote(1) for e in scripted])
    res = generate_april(scripted, buffer, fresh, SCRIPTED, target_groups=2, over_sample_groups=0, version=1)
    assert fresh.asked == [4]  # the buffer filled the step: no fresh prompt taken
    assert res.metrics["groups_resumed"] == 2 and res.metrics["requests"] == 4
    for key, s in _by_id(res.samples).items():
        old = partial[key]
        assert s.response_length == 400 and s.status == SampleStatus.TRUNCATED
        assert s.response_ids[:old.response_length] == old.response_ids
        # The engine was sent prompt + partial response: its first new token sits right after them.
        assert s.response_ids[old.response_length] == len(s.prompt_ids) + old.response_length
        assert s.response_versions == [0] * old.response_length + [1] * (400 - old.response_length)
    assert len(buffer) == 0


def test_scripted_surplus_kept_and_short_data_terminates(scripted):
    buffer = RolloutBuffer()
    fresh = _Fresh(_groups(10, [None, None, None]))
    # Everything finishes before the driver looks: one group returned, the two surplus finished groups kept.
    res = generate_april(scripted, buffer, fresh, SCRIPTED, target_groups=1, over_sample_groups=2, version=0,
                         poll_interval_s=30)
    assert [s.group_id for s in res.samples] == [10, 10]
    assert res.metrics["groups_stashed_finished"] == 2 and len(buffer) == 2
    # Next step: those two are handed back as they are (no request), and the data has run out.
    res = generate_april(scripted, buffer, fresh, SCRIPTED, target_groups=3, over_sample_groups=0, version=0)
    assert sorted({s.group_id for s in res.samples}) == [11, 12] and res.metrics["requests"] == 0
    assert fresh.asked == [3, 1] and len(buffer) == 0
    # Nothing left anywhere: the driver still returns.
    res = generate_april(scripted, buffer, fresh, SCRIPTED, target_groups=2, over_sample_groups=1, version=0)
    assert res.samples == [] and len(buffer) == 0


def test_scripted_all_truncated_and_engine_failure_keeps_groups(scripted):
    buffer = RolloutBuffer()
    res = generate_april(scripted, buffer, _Fresh(_groups(20, [3, 3])), SCRIPTED, target_groups=2,
                         over_sample_groups=0, version=0)
    assert res.num_groups == 2 and all(s.status == SampleStatus.TRUNCATED for s in res.samples)
    bad = _groups(30, [None, None])
    bad[1][0].prompt_ids[0] = -1  # the scripted engine fails on this request
    with pytest.raises(Exception, match="engine failure"):
        generate_april(scripted, buffer, _Fresh(bad), SCRIPTED, target_groups=1, over_sample_groups=1, version=0)
    assert sorted(g[0]["group_id"] for g in buffer.state_dict()["groups"]) == [30, 31]


# ---------------------------------------------------------------------------------------------- real engine
@pytest.fixture(scope="module")
def engine(ray_session, tiny_checkpoint):
    from rollout.engine import RolloutEngineActor

    actor = RolloutEngineActor.options(num_cpus=1).remote(str(tiny_checkpoint), max_total_tokens=8192, seed=0)
    ray_session.get(actor.weight_version.remote(), timeout=300)
    yield actor
    ray_session.get(actor.shutdown.remote(), timeout=120)


def test_sglang_april_over_sample_abort_resume(engine, ray_session, tiny_checkpoint):
    """Step A (version 0): 2 short + 2 long groups, target 2: the long ones are aborted and stashed with their
    partial tokens, logprobs and versions. Weight version bump to 1 (same weights). Step B: they are resumed and
    run to their budget; each response is the old partial one plus the new tokens, tagged 0 then 1, and its
    logprobs equal a prefill score of the whole response (the continuation was conditioned on the partial one).
    Then a step where everything finishes before the driver looks keeps the surplus groups for the next step."""
    long_budget = 160
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, ignore_eos=True)
    buffer = RolloutBufferActor.options(num_cpus=0).remote(1)
    fresh = _Fresh(_groups(0, [None, None, long_budget, long_budget], seed=1) + _groups(4, [4, 4, 4], seed=1))
    a = generate_april([engine], buffer, fresh, settings, target_groups=2, over_sample_groups=2, version=0)
    assert sorted({s.group_id for s in a.samples}) == [0, 1]
    assert all(s.status == SampleStatus.TRUNCATED and s.response_length == 6 for s in a.samples)
    assert a.metrics["groups_in_play"] == 4 and a.metrics["aborted_samples"] == 2 * GROUP
    state = json.loads(json.dumps(ray_session.get(buffer.state_dict.remote())))
    partial = {(s.group_id, s.index_in_group): s for g in state["groups"] for s in map(sample_from_dict, g)}
    assert sorted(partial) == [(g, k) for g in (2, 3) for k in range(GROUP)]
    for s in partial.values():
        assert s.status == SampleStatus.ABORTED and 0 < s.response_length < long_budget
        assert len(s.response_logprobs) == s.response_length and s.response_versions == [0] * s.response_length
    print(f"\nstep A: partial lengths {sorted(s.response_length for s in partial.values())}, "
          f"{a.metrics['time_s']:.1f}s")

    ray_session.get(engine.update_weights_from_disk.remote(str(tiny_checkpoint), 1))
    b = generate_april([engine], buffer, fresh, settings, target_groups=2, over_sample_groups=0, version=1)
    assert fresh.asked == [4] and b.metrics["groups_resumed"] == 2 and b.metrics["groups_fresh"] == 0
    assert b.metrics["carried_tokens"] == sum(s.response_length for s in partial.values())
    resumed = _by_id(b.samples)
    assert sorted(resumed) == sorted(partial)
    for key, s in resumed.items():
        old = partial[key]
        n_old = old.response_length
        assert s.status == SampleStatus.TRUNCATED and s.response_length == long_budget
        assert s.response_ids[:n_old] == old.response_ids and s.response_logprobs[:n_old] == old.response_logprobs
        assert s.response_versions == [0] * n_old + [1] * (long_budget - n_old)
    full = list(resumed.values())
    scores = ray_session.get(engine.score.remote([s.tokens for s in full], [len(s.prompt_ids) for s in full]))
    diff = max(abs(x - y) for s, sc in zip(full, scores) for x, y in zip(sc, s.response_logprobs))
    print(f"step B: resumed to {long_budget} tokens in {b.metrics['time_s']:.1f}s; logprobs vs prefill max {diff:.1e}")
    assert diff <= 1e-4
    assert b.metrics["old_version_tokens_returned"] == sum(o.response_length for o in partial.values())

    # Everything finishes before the driver's first look (30 s): one group out, two finished ones kept.
    c = generate_april([engine], buffer, fresh, settings, target_groups=1, over_sample_groups=2, version=1,
                       poll_interval_s=30)
    assert {s.group_id for s in c.samples} == {4} and c.metrics["groups_stashed_finished"] == 2
    d = generate_april([engine], buffer, fresh, settings, target_groups=2, over_sample_groups=0, version=1)
    assert sorted({s.group_id for s in d.samples}) == [5, 6] and d.metrics["requests"] == 0
    assert all(s.response_length == 4 and s.response_versions == [1] * 4 for s in d.samples)
    assert ray_session.get(buffer.metrics.remote())["buffered_groups"] == 0
