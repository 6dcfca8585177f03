"""Isolation, timeouts, bounded concurrency, cache and weighted combination of reward plugins."""
from __future__ import annotations

import asyncio
import logging
import random

import pytest

from rewards import RewardInput, RewardResult, RewardRunner, RewardSpec, RunnerSettings

P = "tests.rewards.plugins_misbehaving"


def _samples(n):
    return [RewardInput(prompt="p", response=f"response {i}", label=str(i)) for i in range(n)]


def test_weighted_combination_and_components():
    runner = RewardRunner([RewardSpec("char_fraction", 2.0, {"chars": "e"}), RewardSpec(f"{P}:constant", 0.5)])
    [result] = runner.score_many_sync([RewardInput(prompt="p", response="eeee")])
    assert result.score == pytest.approx(2.0 * 1.0 + 0.5 * 0.25)
    assert result.components["char_fraction/score"] == 1.0
    assert result.components["char_fraction/hits"] == 4.0
    assert result.components[f"{P}:constant/error"] == 0.0


@pytest.mark.parametrize("plugin, error", [("raises", "RuntimeError: plugin bug"),
                                           ("hangs", "timed out"),
                                           ("returns_garbage", "returned dict, not RewardResult")])
def test_faulty_plugin_gets_fallback_and_run_continues(plugin, error, caplog):
    runner = RewardRunner([RewardSpec(f"{P}:{plugin}"), RewardSpec(f"{P}:constant")],
                          RunnerSettings(timeout_s=0.2, fallback_score=-0.5))
    with caplog.at_level(logging.ERROR):
        results = runner.score_many_sync(_samples(3), sample_ids=["a", "b", "c"])
    for r in results:
        assert r.score == pytest.approx(-0.5 + 0.25)
        assert r.components[f"{P}:{plugin}/error"] == 1.0
        assert error in r.info[f"{P}:{plugin}"]["error"]
    assert "on sample b" in caplog.text and error in caplog.text


def test_concurrency_is_bounded():
    from tests.rewards import plugins_misbehaving as m

    m.IN_FLIGHT.update(now=0, peak=0)
    runner = RewardRunner([RewardSpec(f"{P}:tracks_concurrency")], RunnerSettings(max_concurrency=5))
    results = runner.score_many_sync(_samples(40))
    assert len(results) == 40
    assert m.IN_FLIGHT["peak"] == 5


def test_cache_hits_skip_the_plugin():
    from tests.rewards import plugins_misbehaving as m

    m.CALLS.clear()
    runner = RewardRunner([RewardSpec(f"{P}:counts_calls")], RunnerSettings(cache_size=100))
    samples = _samples(5)
    first = runner.score_many_sync(samples)
    second = runner.score_many_sync(samples)
    assert [r.score for r in first] == [r.score for r in second]
    assert len(m.CALLS) == 5 and runner.stats["cache_hits"] == 5


def test_identical_samples_are_scored_once_and_each_gets_its_own_copy():
    """A group of 8 where a warmed-up policy sampled one response 5 times: 4 plugin calls, not 8."""
    from tests.rewards import plugins_misbehaving as m

    m.CALLS.clear()
    runner = RewardRunner([RewardSpec(f"{P}:counts_calls")])
    meta = {"row": 3, "task": "coding_fn"}
    responses = ["same", "same", "other", "same", "third", "same", "same", "x"]
    samples = [RewardInput(prompt="p", response=r, label="L", metadata=dict(meta)) for r in responses]
    results = runner.score_many_sync(samples)
    assert sorted(m.CALLS) == ["other", "same", "third", "x"]
    assert [r.score for r in results] == [float(len(r)) for r in responses]
    assert runner.stats["deduplicated"] == 4
    results[0].components["mutated"] = 1.0  # copies, not one shared object
    assert "mutated" not in results[1].components


@pytest.mark.parametrize("differs", ["prompt", "label", "metadata"])
def test_samples_differing_in_any_input_are_scored_apart(differs):
    from tests.rewards import plugins_misbehaving as m

    m.CALLS.clear()
    base = dict(prompt="p", response="same", label="L", metadata={"row": 1})
    other = {**base, differs: {"row": 2} if differs == "metadata" else "q"}
    RewardRunner([RewardSpec(f"{P}:counts_calls")]).score_many_sync([RewardInput(**base), RewardInput(**other)])
    assert m.CALLS == ["same", "same"]


def test_dedupe_off_or_unserialisable_inputs_score_every_sample():
    from tests.rewards import plugins_misbehaving as m

    class Opaque:  # equal reprs, unequal objects: never taken for one another
        def __repr__(self):
            return "Opaque"

    m.CALLS.clear()
    RewardRunner([RewardSpec(f"{P}:counts_calls")], RunnerSettings(dedupe=False)).score_many_sync(
        [RewardInput(prompt="p", response="same")] * 3)
    RewardRunner([RewardSpec(f"{P}:counts_calls")]).score_many_sync(
        [RewardInput(prompt="p", response="same", metadata={"o": Opaque()}) for _ in range(2)])
    assert m.CALLS == ["same"] * 5


def test_many_calls_with_mixed_failures_do_not_deadlock():
    specs = [RewardSpec(f"{P}:sometimes_slow"), RewardSpec(f"{P}:sometimes_raises")]
    runner = RewardRunner(specs, RunnerSettings(timeout_s=0.05, max_concurrency=32))
    random.seed(0)
    results = asyncio.run(asyncio.wait_for(runner.score_many(_samples(300)), timeout=60))
    assert len(results) == 300
    assert runner.stats["timeouts"] > 0 and runner.stats["errors"] > 0


def test_bad_settings_and_specs_are_named():
    with pytest.raises(ValueError, match="timeout_s"):
        RunnerSettings(timeout_s=0)
    with pytest.raises(ValueError, match="unique"):
        RewardRunner([RewardSpec("char_fraction"), RewardSpec("char_fraction")])
    with pytest.raises(ValueError, match="unknown reward"):
        RewardRunner([RewardSpec("nope")])
    assert isinstance(RewardResult(1), RewardResult)
