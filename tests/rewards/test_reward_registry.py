from __future__ import annotations

import asyncio

import pytest

from rewards import RewardInput, RewardResult, get_reward, load_reward, register_reward, registered_rewards


def run(coro):
    return asyncio.run(coro)


def test_builtins_are_registered():
    assert {"char_fraction", "exact_match"} <= set(registered_rewards())


def test_char_fraction_scores_share_of_chars():
    fn = load_reward("char_fraction", {"chars": "ab"})
    result = run(fn(RewardInput(prompt="p", response="abcd")))
    assert result.score == pytest.approx(0.5)
    assert result.components["hits"] == 2.0
    assert run(fn(RewardInput(prompt="p", response=""))).score == 0.0


def test_exact_match_needs_label():
    fn = get_reward("exact_match")
    assert run(fn(RewardInput(prompt="p", response=" Paris ", label="Paris"))).score == 1.0
    assert run(fn(RewardInput(prompt="p", response="Lyon", label="Paris"))).score == 0.0
    with pytest.raises(ValueError, match="label"):
        run(fn(RewardInput(prompt="p", response="x")))


def test_unknown_reward_and_argument_are_named():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ValueError, match=r"does not take argument\(s\) \['bogus'\]"):
        load_reward("char_fraction", {"bogus": 1})


def test_dotted_path_plugin_loads():
    fn = load_reward("tests.rewards.plugin_example:always_half")
    assert run(fn(RewardInput(prompt="p", response="x"))).score == 0.5


def test_sync_function_is_rejected():
    with pytest.raises(TypeError, match="async def"):
        register_reward("sync_one")(lambda sample: RewardResult(1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", True])
def test_result_rejects_non_finite_or_non_numeric(bad):
    with pytest.raises((TypeError, ValueError)):
        RewardResult(bad)
