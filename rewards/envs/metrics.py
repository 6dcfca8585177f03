"""Metrics of a set of finished episodes (a training batch, an evaluation), for the run's log.

Rates are over the calls (tool-call success, malformed, failed) or the episodes (end reasons, environment errors)
of the whole set, not means of per-episode rates, so an episode with many calls weighs as much as its calls.
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from rewards.envs.api import MalformedKind
from rewards.envs.runner import EndReason, EpisodeResult


def episode_metrics(results: list[EpisodeResult], prefix: str = "agent") -> dict[str, float]:
    if not results:
        return {}
    metrics: dict[str, float] = {f"{prefix}/episodes": float(len(results))}
    _spread(metrics, f"{prefix}/turns", [r.stats.turns for r in results])
    _spread(metrics, f"{prefix}/episode_tokens", [r.tokens for r in results])
    _spread(metrics, f"{prefix}/env_time_s", [r.stats.env_time_s for r in results])
    calls = sum(r.stats.tool_calls for r in results)
    metrics[f"{prefix}/tool_calls/per_episode"] = calls / len(results)
    if calls:
        malformed: Counter = sum((r.stats.malformed for r in results), Counter())
        metrics[f"{prefix}/tool_call_success_rate"] = sum(r.stats.successful_calls for r in results) / calls
        metrics[f"{prefix}/malformed_call_rate"] = sum(malformed.values()) / calls
        metrics[f"{prefix}/failed_call_rate"] = sum(r.stats.failed_calls for r in results) / calls
        for kind in MalformedKind:
            metrics[f"{prefix}/malformed/{kind.value}_rate"] = malformed[kind.value] / calls
    metrics[f"{prefix}/env_errors/per_episode"] = statistics.fmean(r.stats.env_errors for r in results)
    metrics[f"{prefix}/env_timeouts/per_episode"] = statistics.fmean(r.stats.env_timeouts for r in results)
    ends = Counter(r.end_reason for r in results)
    for reason in EndReason:
        metrics[f"{prefix}/end/{reason.value}"] = ends[reason] / len(results)
    by_env: dict[str, list[EpisodeResult]] = defaultdict(list)
    for r in results:
        by_env[r.env].append(r)
    for env, group in sorted(by_env.items()):
        metrics[f"{prefix}/{env}/reward"] = statistics.fmean(r.reward for r in group)
        metrics[f"{prefix}/{env}/turn_reward"] = statistics.fmean(sum(r.turn_rewards) for r in group)
        metrics[f"{prefix}/{env}/episodes"] = float(len(group))
    return metrics


def _spread(metrics: dict[str, float], name: str, values: list[float]) -> None:
    metrics[f"{name}/mean"] = statistics.fmean(values)
    metrics[f"{name}/max"] = float(max(values))
