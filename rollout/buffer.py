"""The partial-rollout (APRIL) buffer: prompt groups whose generation was cut short, kept for the next step.

`RolloutBuffer` is a plain class (unit-testable, usable in-process); `RolloutBufferActor` is the same class as a
Ray actor, so the buffer outlives any one driver call and could be shared by several drivers.

A group is a list of `Sample`s of one prompt. It is stashed whole: its finished samples keep their responses, its
aborted ones keep their partial responses (tokens, logprobs, per-token weight versions) and are resumed from
there. Handing a group back applies the staleness bound: a sample whose oldest token is more than
`max_staleness` weight versions behind the current one is reset to its bare prompt and regenerated. The bound is
applied to finished samples of the group too: GRPO compares the samples of a group with each other, and an old
finished sample is as off-policy as an old partial one.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import ray

from rollout.sample import Sample, sample_from_dict, sample_to_dict

STATE_FORMAT = 1
_COUNTERS = ("stashed_groups", "stashed_partial_samples", "resumed_groups", "reset_stale_samples",
             "carried_tokens")


class RolloutBuffer:
    def __init__(self, max_staleness: int = 1):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = int(max_staleness)
        # group_id -> samples; insertion order is the order groups are handed back (oldest first, which keeps
        # their tokens as fresh as the bound allows and makes every stashed group come back eventually).
        self._groups: OrderedDict[int, list[Sample]] = OrderedDict()
        self._totals = dict.fromkeys(_COUNTERS, 0)

    def __len__(self) -> int:
        return len(self._groups)

    def put(self, groups: list[list[Sample]]) -> int:
        """Stashes groups (each the complete list of one prompt's samples); returns the number now buffered."""
        for group in groups:
            gid = _group_id(group)
            if gid in self._groups:
                raise ValueError(f"group {gid} is already in the rollout buffer")
            self._groups[gid] = sorted(group, key=lambda s: s.index_in_group)
            self._totals["stashed_groups"] += 1
            self._totals["stashed_partial_samples"] += sum(not s.finished for s in group)
        return len(self._groups)

    def pop(self, n: int, current_version: int) -> list[list[Sample]]:
        """Up to `n` groups, oldest first, with samples older than the staleness bound reset to their prompt."""
        out = []
        while self._groups and len(out) < n:
            _gid, group = self._groups.popitem(last=False)
            for s in group:
                oldest = s.oldest_version
                if oldest is not None and current_version - oldest > self.max_staleness:
                    s.reset_response()
                    self._totals["reset_stale_samples"] += 1
            self._totals["resumed_groups"] += 1
            self._totals["carried_tokens"] += sum(s.response_length for s in group)
            out.append(group)
        return out

    def metrics(self) -> dict[str, float]:
        """Running totals since the start (or the loaded checkpoint), and what is buffered now."""
        return {**{f"total_{k}": float(v) for k, v in self._totals.items()},
                "buffered_groups": float(len(self._groups)),
                "buffered_tokens": float(sum(s.response_length for g in self._groups.values() for s in g))}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data: the buffered groups (in order) and the counters."""
        return {"format": STATE_FORMAT, "max_staleness": self.max_staleness, "totals": dict(self._totals),
                "groups": [[sample_to_dict(s) for s in g] for g in self._groups.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replaces the buffer's content. The configured max_staleness stays: a resumed run may tighten it."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"rollout buffer state has format {state.get('format')!r}, expected {STATE_FORMAT}")
        groups: OrderedDict[int, list[Sample]] = OrderedDict()
        for raw in state["groups"]:
            group = [sample_from_dict(d) for d in raw]
            gid = _group_id(group)
            if gid in groups:
                raise ValueError(f"rollout buffer state holds group {gid} twice")
            groups[gid] = group
        self._groups = groups
        self._totals = {k: int(state.get("totals", {}).get(k, 0)) for k in _COUNTERS}


def _group_id(group: list[Sample]) -> int:
    if not group:
        raise ValueError("cannot stash an empty group")
    ids = {s.group_id for s in group}
    if len(ids) != 1:
        raise ValueError(f"a group holds samples of several groups: {sorted(ids)}")
    indices = sorted(s.index_in_group for s in group)
    if indices != list(range(len(group))):
        raise ValueError(f"group {next(iter(ids))} has sample indices {indices}, expected 0..{len(group) - 1}")
    return next(iter(ids))


# Few, short calls from one driver: no CPU reservation needed (the driver gives it num_cpus=0).
RolloutBufferActor = ray.remote(RolloutBuffer)
