"""RolloutBuffer: staleness reset, JSON state round trip, and no sample lost or duplicated. No engines, no Ray
except the last test (the actor form)."""
from __future__ import annotations

import json

import pytest

from rollout.buffer import RolloutBuffer
from rollout.sample import Sample, SampleStatus, sample_from_dict, sample_to_dict


def _group(gid: int, size: int = 3, partial: dict[int, tuple[int, int]] | None = None) -> list[Sample]:
    """Samples of group gid; partial maps index -> (tokens, version): that sample holds an aborted response of
    `tokens` tokens from `version`. The others are finished (if any sample is partial) or untouched."""
    partial = partial or {}
    group = []
    for k in range(size):
        s = Sample(prompt_ids=[1, 2, 3 + gid], group_id=gid, index_in_group=k, prompt=[{"role": "user",
                   "content": f"q{gid}"}], label=str(gid), metadata={"row": gid})
        if k in partial:
            n, version = partial[k]
            s.append_response([10 + i for i in range(n)], [-0.5] * n, version)
            s.status, s.response_text = SampleStatus.ABORTED, "x" * n
        elif partial:
            s.append_response([20, 21], [-0.1, -0.2], min(v for _n, v in partial.values()))
            s.status = SampleStatus.COMPLETED
        group.append(s)
    return group


def _ids(groups) -> list[tuple[int, int]]:
    return sorted((s.group_id, s.index_in_group) for g in groups for s in g)


def test_pop_hands_back_oldest_first_and_keeps_partial_tokens():
    buf = RolloutBuffer(max_staleness=1)
    buf.put([_group(5, partial={0: (4, 2)}), _group(3, partial={1: (7, 2)})])
    (first,) = buf.pop(1, current_version=3)
    assert first[0].group_id == 5  # insertion order, not group id order
    assert first[0].response_ids == [10, 11, 12, 13] and first[0].response_versions == [2] * 4
    assert first[0].status == SampleStatus.ABORTED
    assert buf.metrics()["total_carried_tokens"] == 4 + 2 * 2
    assert len(buf) == 1


def test_stale_samples_are_reset_not_lost():
    buf = RolloutBuffer(max_staleness=1)
    # group 0: a partial sample from version 0 and finished ones from version 0; group 1 fresh enough.
    buf.put([_group(0, partial={2: (5, 0)}), _group(1, partial={0: (3, 1)})])
    out = buf.pop(10, current_version=2)
    assert _ids(out) == [(g, k) for g in (0, 1) for k in range(3)]
    stale, fresh = out
    for s in stale:  # every sample of version 0 is 2 versions behind: back to its prompt, to be regenerated
        assert s.response_ids == s.response_logprobs == s.response_versions == []
        assert s.status == SampleStatus.PENDING and s.response_text == "" and s.prompt_ids == [1, 2, 3]
    assert fresh[0].response_length == 3 and fresh[0].status == SampleStatus.ABORTED
    assert [s.status for s in fresh[1:]] == [SampleStatus.COMPLETED] * 2
    m = buf.metrics()
    assert m["total_reset_stale_samples"] == 3
    assert m["total_resumed_groups"] == 2 and m["buffered_groups"] == 0


def test_staleness_zero_keeps_only_current_version():
    buf = RolloutBuffer(max_staleness=0)
    buf.put([_group(0, partial={0: (2, 4)}), _group(1, partial={0: (2, 5)})])
    old, current = buf.pop(2, current_version=5)
    assert old[0].response_length == 0 and current[0].response_length == 2


def test_state_round_trips_through_json():
    buf = RolloutBuffer(max_staleness=2)
    groups = [_group(7, partial={0: (3, 1), 2: (1, 0)}), _group(2), _group(9, size=2, partial={1: (6, 1)})]
    groups[0][0].reward_components = {"a": 0.5}
    buf.put(groups)
    buf.pop(0, current_version=1)
    state = json.loads(json.dumps(buf.state_dict()))
    other = RolloutBuffer(max_staleness=2)
    other.load_state_dict(state)
    assert other.state_dict() == buf.state_dict()
    assert other.metrics() == buf.metrics()
    back = other.pop(10, current_version=1)
    assert [g[0].group_id for g in back] == [7, 2, 9]
    for got, want in zip([s for g in back for s in g], [s for g in groups for s in g]):
        assert got == want  # dataclass equality: every field, status enum included
        assert isinstance(got.status, SampleStatus)


def test_sample_dict_rejects_inconsistent_response():
    d = sample_to_dict(_group(0, partial={0: (3, 0)})[0])
    d["response_versions"] = d["response_versions"][:-1]
    with pytest.raises(ValueError, match="3 tokens, 3 logprobs, 2 versions"):
        sample_from_dict(d)
    with pytest.raises(ValueError, match="unknown fields"):
        sample_from_dict({**sample_to_dict(_group(0)[0]), "extra": 1})


def test_no_sample_lost_or_duplicated_over_many_cycles():
    """Put/pop cycles with changing versions: every sample put in comes out exactly once per pop, whether reset
    or not, and a group cannot be stashed twice."""
    buf = RolloutBuffer(max_staleness=1)
    put_ids: list[tuple[int, int]] = []
    popped: list[tuple[int, int]] = []
    next_gid = 0
    for version in range(6):
        new = [_group(next_gid + i, partial={i % 3: (i + 1, version)}) for i in range(3)]
        next_gid += 3
        put_ids += _ids(new)
        buf.put(new)
        out = buf.pop(2, current_version=version + 1)
        popped += _ids(out)
        buf.put(out[:1])  # one comes back (as a driver stashes unfinished groups again)
        put_ids += _ids(out[:1])
    popped_again = _ids(buf.pop(10**6, current_version=99))
    # Everything put is popped exactly as often as it was put.
    assert sorted(popped + popped_again) == sorted(put_ids)
    assert len(buf) == 0
    with pytest.raises(ValueError, match="already in the rollout buffer"):
        buf.put([_group(1), _group(1)])


def test_rejects_bad_groups_and_state():
    buf = RolloutBuffer()
    with pytest.raises(ValueError, match="empty group"):
        buf.put([[]])
    with pytest.raises(ValueError, match="several groups"):
        buf.put([_group(0)[:1] + _group(1)[1:]])
    with pytest.raises(ValueError, match="indices"):
        buf.put([_group(0)[1:]])
    with pytest.raises(ValueError, match="format"):
        buf.load_state_dict({"format": 99, "groups": []})
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutBuffer(max_staleness=-1)


def test_actor_form(ray_session):
    from rollout.buffer import RolloutBufferActor

    actor = RolloutBufferActor.options(num_cpus=0).remote(1)
    ray_session.get(actor.put.remote([_group(4, partial={0: (2, 0)})]))
    state = ray_session.get(actor.state_dict.remote())
    json.dumps(state)
    (group,) = ray_session.get(actor.pop.remote(5, 1))
    assert group[0].response_ids == [10, 11] and group[0].response_versions == [0, 0]
    assert ray_session.get(actor.metrics.remote())["buffered_groups"] == 0
