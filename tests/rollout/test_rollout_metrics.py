"""Per-batch rollout metrics computed from the samples themselves."""
from __future__ import annotations

from rollout.metrics import duplicate_response_frac
from rollout.sample import Sample


def _group(gid: int, responses: list[list[int]]) -> list[Sample]:
    return [Sample(prompt_ids=[1], group_id=gid, index_in_group=k, response_ids=r) for k, r in enumerate(responses)]


def test_duplicate_response_frac_counts_repeats_within_a_group_only():
    # group 0: 4 samples, 2 distinct -> 2 repeats; group 1: the same response as group 0's, once -> no repeat
    groups = [_group(0, [[5, 6], [5, 6], [7], [5, 6]]), _group(1, [[5, 6], [8], [9], [10]])]
    assert duplicate_response_frac(groups) == 2 / 8
    assert duplicate_response_frac([_group(0, [[1]] * 8)]) == 7 / 8  # one response sampled 8 times
    assert duplicate_response_frac([]) == 0.0
