"""Metrics of a set of scored samples (a training batch, an evaluation): rewards, their components and the
rewards' own batch metrics (e.g. factuality's hallucination rate), response lengths, staleness."""
from __future__ import annotations

import statistics
from collections import Counter

from rewards import reward_batch_metrics
from rollout.sample import Sample


def sample_metrics(samples: list[Sample], prefix: str, reward_prefix: str,
                   reward_names: dict[str | None, list[str]]) -> dict[str, float]:
    """Metrics of scored samples; `reward_names` names the rewards of each task (None: the run's default reward).
    When the samples come from several task families (their rows' `task`), each family also gets
    `<prefix>/<task>/raw_reward`, its response lengths and its rewards' batch metrics
    (e.g. `eval/factuality_qa/hallucination_rate`)."""
    if not samples:
        return {}
    names = sorted({n for ns in reward_names.values() for n in ns})
    metrics = {f"{prefix}/raw_reward": statistics.fmean(s.reward for s in samples),
               f"{prefix}/response_len/mean": statistics.fmean(s.response_length for s in samples),
               f"{prefix}/response_len/max": float(max(s.response_length for s in samples)),
               f"{prefix}/truncated_frac": statistics.fmean(s.status.value == "truncated" for s in samples)}
    for key in sorted({k for s in samples for k in s.reward_components}):
        values = [s.reward_components[key] for s in samples if key in s.reward_components]
        metrics[f"{reward_prefix}/{key}"] = statistics.fmean(values)
    for name in names:
        batch = reward_batch_metrics_for(name, [s.reward_components for s in samples])
        metrics.update({reward_prefix + k[len("reward"):]: v for k, v in batch.items()})
    tasks = sorted({s.metadata.get("task") for s in samples if s.metadata.get("task")})
    for task in tasks:
        own = [s for s in samples if s.metadata.get("task") == task]
        metrics[f"{prefix}/{task}/raw_reward"] = statistics.fmean(s.reward for s in own)
        metrics[f"{prefix}/{task}/response_len/mean"] = statistics.fmean(s.response_length for s in own)
        metrics[f"{prefix}/{task}/samples"] = float(len(own))
        for name in reward_names.get(task, reward_names.get(None, [])):
            batch = reward_batch_metrics_for(name, [s.reward_components for s in own])
            metrics.update({f"{prefix}/{task}/{k.rsplit('/', 1)[-1]}": v for k, v in batch.items()})
    return metrics


def reward_batch_metrics_for(name: str, components: list[dict[str, float]]) -> dict[str, float]:
    """reward/<name>/<metric> from the reward's own batch-metrics function (e.g. factuality's hallucination
    rate), fed the components of that reward only (the runner prefixes them with '<name>/')."""
    fn = reward_batch_metrics(name)
    if fn is None:
        return {}
    prefix = f"{name}/"
    own = [{k[len(prefix):]: v for k, v in c.items() if k.startswith(prefix)} for c in components]
    return {f"reward/{name}/{k}": float(v) for k, v in fn(own).items()}


def duplicate_response_frac(groups: list[list[Sample]]) -> float:
    """The share of samples whose response repeats an earlier one of the same group: samples the reward runner
    does not score again (rewards.RunnerSettings.dedupe), and a sign of how little a group's samples still differ
    (all of a group equal: its advantages are 0)."""
    total = sum(len(g) for g in groups)
    distinct = sum(len({tuple(s.response_ids) for s in g}) for g in groups)
    return (total - distinct) / total if total else 0.0


def token_ages(samples: list[Sample], train_version: int) -> Counter[int]:
    """How many response tokens are each number of policy versions old when trained at `train_version`."""
    return Counter(train_version - v for s in samples for v in s.response_versions)


def staleness_metrics(ages: Counter[int]) -> dict[str, float]:
    total = sum(ages.values())
    if not total:
        return {"rollout/staleness/max": 0.0, "rollout/staleness/mean": 0.0,
                "rollout/staleness/off_policy_token_frac": 0.0}
    return {"rollout/staleness/max": float(max(ages)),
            "rollout/staleness/mean": sum(a * n for a, n in ages.items()) / total,
            "rollout/staleness/off_policy_token_frac": sum(n for a, n in ages.items() if a > 0) / total}
