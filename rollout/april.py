"""APRIL (active partial rollouts): over-sample prompt groups, stop once enough have finished, keep the rest.

One call of `generate_april` is one rollout step:
1. take up to `target_groups + over_sample_groups` groups from the buffer (partial groups of earlier steps,
   oldest first, after its staleness bound), and fill up with fresh prompt groups;
2. send every unfinished sample to the engines (a group's samples all go to one engine, groups round-robin), a
   resumed sample as prompt + its partial response with the budget it has left;
3. watch the engines' finished requests; once `target_groups` groups have every sample finished (stopped or
   truncated), abort what is still running;
4. return `target_groups` finished groups (fewer only if fewer could finish: the data ran out, or the engine
   aborted requests on its own) and stash every other group in the buffer -- the partial ones to resume, and
   finished surplus groups (those that completed while the abort was on its way) to be returned first next step.
   Nothing generated and no prompt is dropped.

Why stragglers cost little here: their tokens are kept with the logprob and weight version of each token, so the
trainer sees exact behaviour logprobs even for responses produced by two policies.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from rollout.generation import SamplingSettings, apply_result
from rollout.sample import Sample, SampleStatus

log = logging.getLogger(__name__)


@dataclass
class AprilResult:
    samples: list[Sample]                      # finished groups, laid out group after group
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len({s.group_id for s in self.samples})


def generate_april(engines: list, buffer, new_groups: Callable[[int], list[list[Sample]]],
                   settings: SamplingSettings, *, target_groups: int, over_sample_groups: int, version: int,
                   decode: Callable[[list[int]], str] | None = None, poll_interval_s: float = 0.1,
                   abort_timeout_s: float = 300.0) -> AprilResult:
    """One APRIL rollout step.

    engines: RolloutEngineActor handles (or anything with the same remote methods).
    buffer: a RolloutBufferActor handle or a plain RolloutBuffer.
    new_groups(n): up to n fresh groups (lists of unanswered Samples with unique group ids); fewer when the data
        runs out.
    version: the engines' current weight version, for the staleness bound.
    decode: token ids -> text, for responses generated in several pieces (see generation.apply_result).
    """
    if target_groups < 1 or over_sample_groups < 0:
        raise ValueError(f"need target_groups >= 1 and over_sample_groups >= 0, got {target_groups}, "
                         f"{over_sample_groups}")
    t0 = time.perf_counter()
    wanted = target_groups + over_sample_groups
    groups: list[list[Sample]] = _buffer(buffer, "pop", wanted, version)
    resumed = len(groups)
    carried = sum(s.response_length for g in groups for s in g)
    try:
        groups += new_groups(wanted - len(groups)) if len(groups) < wanted else []
        stats = _run(engines, groups, settings, target_groups, version, decode, poll_interval_s, abort_timeout_s)
    except BaseException:
        # Whatever went wrong, the prompts and the tokens generated before this step stay in the buffer.
        _buffer(buffer, "put", [g for g in groups if g])
        raise

    finished = [g for g in groups if all(s.finished for s in g)]
    returned = finished[:target_groups]
    keep = {id(g) for g in returned}
    stash = [g for g in groups if id(g) not in keep]
    _buffer(buffer, "put", stash)
    if len(returned) < target_groups:
        log.warning("APRIL: only %d of %d groups finished this step (%d groups in play)", len(returned),
                    target_groups, len(groups))

    metrics = {"groups_in_play": float(len(groups)), "groups_resumed": float(resumed),
               "groups_fresh": float(len(groups) - resumed), "groups_returned": float(len(returned)),
               "groups_stashed_partial": float(sum(not all(s.finished for s in g) for g in stash)),
               "groups_stashed_finished": float(sum(all(s.finished for s in g) for g in stash)),
               "carried_tokens": float(carried),
               "old_version_tokens_returned": float(sum(v < version for g in returned for s in g
                                                        for v in s.response_versions)),
               "time_s": time.perf_counter() - t0, **stats}
    metrics.update({f"buffer/{k}": v for k, v in _buffer(buffer, "metrics").items()})
    return AprilResult([s for g in returned for s in sorted(g, key=lambda s: s.index_in_group)], metrics)


def _run(engines: list, groups: list[list[Sample]], settings: SamplingSettings, target_groups: int, version: int,
         decode, poll_interval_s: float, abort_timeout_s: float) -> dict[str, float]:
    """Generates until `target_groups` groups are finished (or nothing runs any more); mutates the samples."""
    nonce = uuid.uuid4().hex[:8]  # rids stay unique when a sample is resumed at the same weight version
    per_engine: list[list[tuple[str, Sample]]] = [[] for _ in engines]
    group_rids: list[set[str]] = []  # per group, the requests it waits for
    for i, group in enumerate(groups):
        rids = set()
        for s in group:
            if s.finished:
                continue
            if _budget(s, settings) <= 0:  # was aborted exactly as it used up its budget: it is done
                s.status = SampleStatus.TRUNCATED
                continue
            rid = f"g{s.group_id}/s{s.index_in_group}/v{version}/{nonce}"
            per_engine[i % len(engines)].append((rid, s))
            rids.add(rid)
        group_rids.append(rids)
    if sum(not rids for rids in group_rids) >= target_groups:  # enough finished groups without generating
        return {"requests": 0.0, "aborted_samples": 0.0, "time_to_target_s": 0.0}

    calls = {}
    for engine, batch in zip(engines, per_engine):
        if batch:
            reqs = [{"rid": rid, "input_ids": s.tokens, "sampling_params": settings.as_sglang(_budget(s, settings))}
                    for rid, s in batch]
            calls[engine.generate.remote(reqs)] = (engine, batch)

    t0 = time.perf_counter()
    pending = list(calls)
    time_to_target = None
    while pending:
        _done, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_interval_s)
        if not pending:
            break
        finished_rids = set().union(*ray.get([calls[ref][0].finished_rids.remote() for ref in calls]))
        if sum(rids <= finished_rids for rids in group_rids) >= target_groups:
            time_to_target = time.perf_counter() - t0
            pending = _abort_all(calls, pending, abort_timeout_s)

    for ref, (_engine, batch) in calls.items():
        for (_rid, s), out in zip(batch, ray.get(ref)):
            apply_result(s, out, decode)
    requests = sum(len(batch) for batch in per_engine)
    return {"requests": float(requests),
            "aborted_samples": float(sum(s.status == SampleStatus.ABORTED for _e, b in calls.values() for _r, s in b)),
            "time_to_target_s": time.perf_counter() - t0 if time_to_target is None else time_to_target}


def _abort_all(calls: dict, pending: list, timeout_s: float) -> list:
    """Aborts every request on the engines still generating, until their generate() calls return.

    Repeated because an abort that reaches SGLang before it has registered a request is dropped (a request can
    still be on its way from the engine's tokenizer to its scheduler)."""
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"engines did not return within {timeout_s:.0f}s of being asked to abort")
        for ref in pending:
            calls[ref][0].abort.remote()
        _done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
    return pending


def _budget(s: Sample, settings: SamplingSettings) -> int:
    total = settings.max_new_tokens if s.max_new_tokens is None else s.max_new_tokens
    return total - s.response_length


def _buffer(buffer, method: str, *args):
    """Calls the buffer whether it is a Ray actor handle or a plain RolloutBuffer."""
    fn = getattr(buffer, method)
    return ray.get(fn.remote(*args)) if hasattr(fn, "remote") else fn(*args)
