"""Runs reward plugins on many samples: weighted combination, per-call timeout, bounded concurrency, identical
samples scored once, an optional result cache, and isolation — a plugin that raises, times out or returns garbage
costs that sample a logged error and the configured fallback score; the run goes on.

Limits of in-process isolation: a plugin that blocks the event loop in synchronous code cannot be interrupted by a
timeout. `python -m rewards check` detects such plugins (they fail its event-loop check); blocking work belongs in
`asyncio.to_thread` or a subprocess (as the coding sandbox does)."""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from rewards.api import RewardFn, RewardInput, RewardResult
from rewards.registry import load_reward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunnerSettings:
    timeout_s: float = 30.0
    max_concurrency: int = 64
    fallback_score: float = 0.0
    cache_size: int = 0  # 0 disables the cache
    # Identical samples of one score_many call (same prompt, response, label and metadata) are scored once and
    # share the result. The plugin contract (`python -m rewards check`) requires a reward to be a function of its
    # input; a policy after its warm-up often samples the same response several times per group (quickstart,
    # coding_fn: 1.9 distinct responses per group of 8). False: every sample gets its own call.
    dedupe: bool = True

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if not math.isfinite(self.fallback_score):
            raise ValueError(f"fallback_score: must be finite, got {self.fallback_score}")


class RewardRunner:
    """Scores samples with a weighted sum of rewards. Components come back as '<reward>/<component>' plus
    '<reward>/score', so each is logged on its own (reward/<reward>/<component>)."""

    def __init__(self, specs: list[RewardSpec], settings: RunnerSettings = RunnerSettings()):
        if not specs:
            raise ValueError("at least one reward is needed")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique in a combination, got {names}")
        self.specs, self.settings = specs, settings
        self._fns: list[RewardFn] = [load_reward(s.name, s.kwargs) for s in specs]
        self._cache: OrderedDict[str, RewardResult] = OrderedDict()
        self.stats = {"calls": 0, "errors": 0, "timeouts": 0, "cache_hits": 0, "deduplicated": 0}

    async def score_many(self, samples: list[RewardInput], sample_ids: list[str] | None = None) -> list[RewardResult]:
        """Scores all samples with at most `max_concurrency` in flight. Workers pull from a shared index, so
        memory stays bounded by the concurrency, not by the number of samples. With `dedupe`, a sample identical
        to an earlier one gets a copy of its result instead of calls of its own."""
        ids = sample_ids or [str(i) for i in range(len(samples))]
        results: list[RewardResult | None] = [None] * len(samples)
        first_of: dict[str, int] = {}
        copies: list[tuple[int, int]] = []  # (sample, the identical earlier sample that is scored)
        scored: list[int] = []
        for i, sample in enumerate(samples):
            key = _input_key(sample, sample.metadata, strict=True) if self.settings.dedupe else None
            if key is not None and key in first_of:
                copies.append((i, first_of[key]))
                continue
            if key is not None:
                first_of[key] = i
            scored.append(i)
        next_index = iter(scored)

        async def worker() -> None:
            for i in next_index:
                results[i] = await self.score(samples[i], ids[i])

        await asyncio.gather(*(worker() for _ in range(min(self.settings.max_concurrency, len(scored)) or 1)))
        for i, original in copies:
            results[i] = copy.deepcopy(results[original])
        self.stats["deduplicated"] += len(copies)
        return results  # type: ignore[return-value]

    def score_many_sync(self, samples: list[RewardInput], sample_ids: list[str] | None = None) -> list[RewardResult]:
        return asyncio.run(self.score_many(samples, sample_ids))

    async def score(self, sample: RewardInput, sample_id: str = "?") -> RewardResult:
        parts = await asyncio.gather(*(self._one(spec, fn, sample, sample_id)
                                       for spec, fn in zip(self.specs, self._fns)))
        total, components, info = 0.0, {}, {}
        for spec, (result, error) in zip(self.specs, parts):
            total += spec.weight * result.score
            components[f"{spec.name}/score"] = result.score
            components.update({f"{spec.name}/{k}": v for k, v in result.components.items()})
            components[f"{spec.name}/error"] = float(error is not None)
            info[spec.name] = {"error": error} if error else result.info
        return RewardResult(total, components, info)

    async def _one(self, spec: RewardSpec, fn: RewardFn, sample: RewardInput,
                   sample_id: str) -> tuple[RewardResult, str | None]:
        key = self._cache_key(spec, sample)
        if key is not None and key in self._cache:
            self.stats["cache_hits"] += 1
            self._cache.move_to_end(key)
            return self._cache[key], None
        self.stats["calls"] += 1
        try:
            result = await asyncio.wait_for(fn(sample), timeout=self.settings.timeout_s)
            if not isinstance(result, RewardResult):
                raise TypeError(f"returned {type(result).__name__}, not RewardResult")
        except asyncio.TimeoutError:
            self.stats["timeouts"] += 1
            return self._fallback(spec, sample_id, f"timed out after {self.settings.timeout_s}s")
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            self.stats["errors"] += 1
            return self._fallback(spec, sample_id, f"{type(exc).__name__}: {exc}")
        if key is not None:
            self._cache[key] = result
            if len(self._cache) > self.settings.cache_size:
                self._cache.popitem(last=False)
        return result, None

    def _fallback(self, spec: RewardSpec, sample_id: str, error: str) -> tuple[RewardResult, str]:
        log.error("reward %r failed on sample %s: %s; scoring it %s", spec.name, sample_id, error,
                  self.settings.fallback_score)
        return RewardResult(self.settings.fallback_score), error

    def _cache_key(self, spec: RewardSpec, sample: RewardInput) -> str | None:
        if self.settings.cache_size <= 0:
            return None
        return _input_key(sample, spec.name, spec.kwargs)


def _input_key(sample: RewardInput, *extra: Any, strict: bool = False) -> str | None:
    """What a deterministic reward's result depends on, as a string; None when it cannot be serialised. `strict`:
    plain JSON values only (two objects can share a repr without being equal), else repr() for the rest."""
    try:
        return json.dumps([*extra, sample.prompt, sample.response, sample.label], sort_keys=True,
                          default=None if strict else repr)
    except (TypeError, ValueError):
        return None
