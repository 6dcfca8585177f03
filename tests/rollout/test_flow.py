"""RolloutFlow (the rollout manager's bookkeeping) under random orders of request progress, finishes, aborts,
scoring, batch requests and weight pushes, for every loop mode: no trained token is older than the staleness
bound, no sample is lost or duplicated, no group is mixed or split, and the loop never stalls. A scripted engine
stands in for SGLang: each in-flight request grows one token at a time under the engines' current version."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from rollout.flow import FlowSettings, RolloutFlow
from rollout.metrics import staleness_metrics, token_ages
from rollout.protocol import EngineResult
from rollout.sample import Sample

MAX_NEW = 6


class World:
    """The flow plus a scripted engine and a trainer that takes batches in the loop's order."""

    def __init__(self, s: FlowSettings, mode: str, push: str, sync_interval: int, rng: random.Random,
                 multi_turn: float = 0.0):
        self.flow, self.mode, self.push, self.interval, self.rng = RolloutFlow(s), mode, push, sync_interval, rng
        self.multi_turn = multi_turn  # the share of groups that are agent episodes
        self.env_waiting: list = []   # (sample, how its turn ended) the scripted environment has to answer
        self.turns: dict[str, int] = {}
        self.running: dict[str, dict] = {}  # rid -> {"ids", "lps", "vers", "target", "budget"}
        self.scoring: list[int] = []
        self.batches: list[tuple[int, list[list[Sample]]]] = []
        self.created = 0

    # engine side ------------------------------------------------------------------------------------
    def admit_and_dispatch(self) -> None:
        while self.flow.capacity() > 0:
            gid = self.flow.admitted
            prompt = [1 + gid % 97, 2]
            agent = self.rng.random() < self.multi_turn
            self.flow.admit([Sample(prompt_ids=prompt, group_id=gid, index_in_group=k, multi_turn=agent)
                             for k in range(self.flow.s.group_size)])
            self.created += 1
        self.env_waiting += self.flow.take_env_work()
        for d in self.flow.dispatch():
            assert d.input_ids == d.sample.tokens and 0 < d.max_new_tokens <= MAX_NEW
            if not self.flow.s.partial_rollout and not d.sample.multi_turn:  # an aborted sample restarts
                assert d.input_ids == d.sample.prompt_ids
            self.running[d.rid] = {"ids": [], "lps": [], "vers": [], "budget": d.max_new_tokens,
                                   "target": self.rng.randint(1, MAX_NEW + 2)}

    def finish(self, rid: str, reason: str | None = None) -> None:
        r = self.running.pop(rid)
        if reason is None:
            reason = "length" if len(r["ids"]) >= r["budget"] else "stop"
        gid = self.flow.on_result(EngineResult(rid, r["ids"], r["lps"], r["vers"], reason))
        if gid is not None:
            self.scoring.append(gid)
        self.env_waiting += self.flow.take_env_work()

    def env_answer(self, i: int) -> None:
        """The scripted environment: a reset gives a prompt; a turn gets 1-2 observation tokens, and the episode
        ends after 1-3 turns (or when the turn used up the budget)."""
        s, ended = self.env_waiting.pop(i)
        if ended is None:
            self.turns[s.key] = self.rng.randint(1, 3)
            gid = self.flow.on_env(s, [], False, prompt_ids=[7, s.group_id % 50 + 1], tokens_left=MAX_NEW)
        else:
            self.turns[s.key] -= 1
            done = self.turns[s.key] == 0 or ended.value == "truncated" or s.response_length >= MAX_NEW - 2
            gid = self.flow.on_env(s, [] if done else [3] * self.rng.randint(1, 2), done,
                                   tokens_left=None if done else MAX_NEW - s.response_length - 2)
        if gid is not None:
            self.scoring.append(gid)

    def step_request(self, rid: str) -> None:
        r = self.running[rid]
        r["ids"].append(5)
        r["lps"].append(-1.0)
        r["vers"].append(self.flow.version)
        if len(r["ids"]) >= min(r["budget"], r["target"]):
            self.finish(rid)

    def score_one(self, i: int) -> None:
        gid = self.scoring.pop(i)
        group = self.flow.groups[gid]
        self.flow.on_scored(gid, [(float(self.rng.random() < 0.5), {}) for _ in group])

    def abort_all(self) -> None:
        for rid in list(self.running):
            self.finish(rid, "abort")

    # trainer side -----------------------------------------------------------------------------------
    def take_batch(self) -> bool:
        batch = self.flow.take_batch()
        if batch is None:
            return False
        j = self.flow.batches_taken - 1
        self.batches.append((j, batch))
        for rid in self.flow.stragglers():  # APRIL: abort what is still running
            if rid in self.running:
                self.finish(rid, "abort")
        if (j + 1) % self.interval == 0:  # train, then push every sync_interval steps
            self.flow.paused = True
            if self.push == "drain":
                while self.running:
                    self.step_request(next(iter(self.running)))
            elif self.push == "abort":
                self.abort_all()
            # "pause" (in place / retract): requests stay and continue under the new weights
            self.flow.on_weights(j + 1)
            self.flow.paused = False
        return True


MODES = {  # mode -> (admission staleness given max_staleness, batch order, push policy)
    "sync": lambda eta: 0,
    "one_step_off": lambda eta: 1,
    "async": lambda eta: eta,
}


@st.composite
def worlds(draw):
    mode = draw(st.sampled_from(sorted(MODES)))
    eta = draw(st.integers(0 if mode == "sync" else 1, 3))
    over = draw(st.integers(0, 2)) if mode == "sync" else 0
    interval = draw(st.integers(1, eta)) if mode == "async" else 1
    push = {"sync": "drain", "one_step_off": "drain"}.get(mode) or draw(st.sampled_from(["abort", "pause"]))
    s = FlowSettings(groups_per_batch=draw(st.integers(1, 3)), group_size=draw(st.integers(2, 3)),
                     max_new_tokens=MAX_NEW, max_staleness=eta, admission_staleness=MODES[mode](eta),
                     over_sample=over, batch_order="finish" if over else "admission",
                     stale_policy=draw(st.sampled_from(["regenerate", "drop"])),
                     partial_rollout=draw(st.booleans()), dynamic_sampling=draw(st.booleans()))
    world = World(s, mode, push, interval, random.Random(draw(st.integers(0, 2**31))),
                  multi_turn=draw(st.sampled_from([0.0, 0.5, 1.0])))
    return world, draw(st.integers(2, 6))


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_random_event_orders_keep_every_guarantee(case):
    w, num_batches = case
    rng = w.rng
    stalled, events_run = 0, 0
    while len(w.batches) < num_batches:
        events_run += 1
        assert events_run < 20_000, "no progress: batches keep failing to form"
        w.admit_and_dispatch()
        events = ([("step", rid) for rid in w.running] + [("score", i) for i in range(len(w.scoring))]
                  + [("env", i) for i in range(len(w.env_waiting))])
        if rng.random() < 0.3 or not events:
            if w.take_batch():
                stalled = 0
                continue
        if not events:
            stalled += 1
            assert stalled < 3, "the loop stalled: nothing runs, nothing to score, and no batch is ready"
            continue
        kind, arg = rng.choice(events)
        {"step": w.step_request, "score": w.score_one, "env": w.env_answer}[kind](arg)
        if w.push != "drain" and rng.random() < 0.02:  # an abort that is not a weight push (e.g. a checkpoint)
            w.abort_all()

    s, trained = w.flow.s, []
    for j, batch in w.batches:
        assert len(batch) == s.groups_per_batch
        for group in batch:
            gids = {x.group_id for x in group}
            assert len(gids) == 1 and [x.index_in_group for x in group] == list(range(s.group_size))
            trained.append(group[0].group_id)
            for x in group:
                assert x.finished and 0 < x.response_length <= MAX_NEW
                assert x.response_versions == sorted(x.response_versions)
                if x.multi_turn:  # a response opens with a model turn; observations carry no logprob
                    mask = x.response_mask
                    assert len(mask) == x.response_length and mask[0] == 1 and x.prompt_ids[0] == 7
                    assert all(x.response_logprobs[i] == 0.0 for i, m in enumerate(mask) if m == 0)
                else:
                    assert x.response_mask is None
                assert all(j - v <= s.max_staleness for v in x.response_versions), (j, x.response_versions)
                assert x.reward is not None
        ages = token_ages([x for g in batch for x in g], j)
        assert staleness_metrics(ages)["rollout/staleness/max"] == max(ages) <= s.max_staleness
    assert len(trained) == len(set(trained)), "a group was trained twice"
    live = set(w.flow.groups)
    assert not live & set(trained)
    assert len(trained) + len(live) + w.flow.dropped == w.flow.admitted == w.created
    if s.batch_order == "admission":
        # The capacity rule alone bounds staleness: the batch-time check never has to step in.
        c = w.flow.counters
        assert c["regenerated_samples"] == c["stale_dropped_groups"] == c["masked_stale_tokens"] == 0
        if not w.flow.dropped:
            assert trained == list(range(len(trained))), "admission order trains groups in the order admitted"
    if w.mode == "sync" and not s.over_sample:
        assert all(x.response_versions == [j] * x.response_length for j, b in w.batches for g in b for x in g)


def _flow(**kw) -> RolloutFlow:
    base = dict(groups_per_batch=2, group_size=2, max_new_tokens=4)
    return RolloutFlow(FlowSettings(**{**base, **kw}))


def _admit_all(flow: RolloutFlow) -> None:
    while flow.capacity():
        gid = flow.admitted
        flow.admit([Sample(prompt_ids=[3, 4], group_id=gid, index_in_group=k) for k in range(flow.s.group_size)])


def _finish_all(flow: RolloutFlow, version: int | None = None, n: int = 2) -> list[int]:
    done = []
    for d in flow.dispatch():
        v = flow.version if version is None else version
        gid = flow.on_result(EngineResult(d.rid, [7] * n, [-0.5] * n, [v] * n, "stop"))
        if gid is not None:
            done.append(gid)
    return done


def test_capacity_rule_by_mode():
    """sync admits one batch per version (plus the over-sample), async max_staleness + 1 batches ahead."""
    assert _flow(admission_staleness=0).capacity() == 2
    assert _flow(admission_staleness=0, over_sample=3).capacity() == 5
    f = _flow(admission_staleness=2)
    assert f.capacity() == 6
    _admit_all(f)
    assert f.capacity() == 0
    f.on_weights(1)
    assert f.capacity() == 2
    f.paused = True
    assert f.capacity() == 0 and f.dispatch() == []


def test_dynamic_sampling_drops_equal_reward_groups_and_refills():
    f = _flow(dynamic_sampling=True)
    _admit_all(f)
    g0, g1 = _finish_all(f)
    assert f.on_scored(g0, [(1.0, {}), (1.0, {})]) is False  # no signal: dropped
    assert f.on_scored(g1, [(1.0, {}), (0.0, {})]) is True
    assert f.take_batch() is None and f.capacity() == 1  # the dropped group's slot is refilled
    _admit_all(f)
    (g2,) = _finish_all(f)
    f.on_scored(g2, [(0.0, {}), (1.0, {})])
    batch = f.take_batch()
    assert [g[0].group_id for g in batch] == [1, 2]
    assert f.metrics()["total_zero_variance_dropped_groups"] == 1.0


@pytest.mark.parametrize("policy", ["regenerate", "drop", "mask"])
def test_stale_policy_at_batch_time(policy):
    """A finish-order batch at version 3 with a group generated at version 0 and max_staleness 1."""
    f = _flow(batch_order="finish", stale_policy=policy, max_staleness=1, over_sample=2)
    _admit_all(f)
    for gid in _finish_all(f, version=0):
        f.on_scored(gid, [(0.0, {}), (1.0, {})])
    f.batches_taken, f.version = 3, 3  # a resumed run at step 3 with these groups from version 0
    batch = f.take_batch()
    if policy == "mask":
        assert batch is not None and f.counters["masked_stale_tokens"] == 8
        assert f.max_age_exceeded(batch[0][0], 3) == 2
    elif policy == "drop":
        assert batch is None and f.dropped == 4 and f.counters["stale_dropped_groups"] == 4
    else:
        assert batch is None and f.counters["regenerated_samples"] == 8
        assert all(s.response_length == 0 for g in f.groups.values() for s in g)


def test_state_round_trip_keeps_partials_and_refuses_in_flight():
    f = _flow(admission_staleness=1)
    _admit_all(f)
    ds = f.dispatch()
    f.on_result(EngineResult(ds[0].rid, [7, 8], [-0.1, -0.2], [0, 0], "abort"))
    with pytest.raises(RuntimeError, match="in flight"):
        f.state_dict()
    for d in ds[1:]:
        f.on_result(EngineResult(d.rid, [9], [-0.3], [0], "stop"))
    state = f.state_dict()
    g = _flow(admission_staleness=1)
    g.load_state_dict(state)
    assert g.state_dict() == state
    (resumed, *_rest) = g.dispatch()
    assert resumed.input_ids == [3, 4, 7, 8] and resumed.max_new_tokens == 2
    bad = dict(state, groups=state["groups"] + [state["groups"][0]])
    with pytest.raises(ValueError, match="repeated group 0"):
        g.load_state_dict(bad)
