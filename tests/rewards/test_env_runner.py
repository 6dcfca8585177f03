"""The environment runner: limits (timeouts, max turns, token budget), isolation from environments that raise,
hang or return garbage, malformed-call replies, registration and loading."""
from __future__ import annotations

import asyncio
import logging

import pytest

from rewards.envs import (AssistantTurn, EndReason, EnvRunner, EnvSettings, MalformedCall, MalformedKind, ToolCall,
                          load_env, registered_envs)
from tests.rewards.envs_misbehaving import counter_task

M = "tests.rewards.envs_misbehaving"


def add(n: int, index: int = 0) -> ToolCall:
    return ToolCall(f"c{index}", "add", {"n": n}, index)


def calls(*tool_calls, malformed=()) -> AssistantTurn:
    return AssistantTurn("", tuple(tool_calls), tuple(malformed))


FINAL = AssistantTurn("done")


def play(env: str, turns: list[AssistantTurn], settings: EnvSettings = EnvSettings(), tokens_per_turn: int = 5,
         observation_tokens: int = 5, runner: EnvRunner | None = None):
    """Plays scripted turns until the episode ends; returns (turn results, episode result, runner)."""
    runner = runner or EnvRunner(env, settings=settings)

    async def go():
        session = await runner.start(counter_task())
        results = []
        for turn in turns:
            if session.done:
                break
            result = await session.step(turn, tokens_per_turn)
            results.append(result)
            if not result.done:
                session.add_observation_tokens(observation_tokens)
        return results, await session.finish()

    results, episode = asyncio.run(go())
    return results, episode, runner


def test_a_well_behaved_episode():
    results, episode, _ = play(f"{M}:Counter", [calls(add(1)), calls(add(2, 0), add(0, 1)), FINAL])
    assert [r.done for r in results] == [False, False, True]
    assert results[0].observations == [{"role": "tool", "tool_call_id": "c0", "content": "1"}]
    assert [m["content"] for m in results[1].observations] == ["3", "3"]
    assert episode.end_reason is EndReason.DONE and episode.reward == 1.0
    assert episode.turn_rewards == [0.1, 0.1, 0.0]
    assert episode.stats.turns == 3 and episode.stats.tool_calls == 3 and episode.stats.successful_calls == 3
    assert episode.tokens == 3 * 5 + 2 * 5
    roles = [m["role"] for m in episode.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "tool", "assistant"]


def test_a_factory_function_and_kwargs_load():
    _, episode, _ = play(f"{M}:make_counter", [calls(add(3)), FINAL], runner=EnvRunner(f"{M}:make_counter",
                                                                                         {"turn_reward": 0.5}))
    assert episode.turn_rewards == [0.5, 0.0] and episode.reward == 1.0


def test_unknown_kwargs_and_non_environments_are_refused_at_load():
    with pytest.raises(ValueError, match="does not take argument"):
        load_env(f"{M}:Counter", {"nope": 1})
    with pytest.raises(TypeError, match="needs `async def` methods"):
        load_env(f"{M}:NotAnEnvironment")
    with pytest.raises(ValueError, match="unknown environment"):
        load_env("no_such_env")
    with pytest.raises(ValueError, match="could not be loaded"):
        load_env(f"{M}:Missing")


def test_a_file_path_loads(tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text("from tests.rewards.envs_misbehaving import Counter as Env\n")
    assert load_env(f"{path}").factory.__name__ == "Counter"
    assert {"calculator", "terminal", "coding_agent"} <= set(registered_envs())


@pytest.mark.parametrize("stage, kind, reason, error", [
    ("Reset", "Raises", EndReason.RESET_FAILED, "RuntimeError: environment bug"),
    ("Reset", "Hangs", EndReason.RESET_FAILED, "reset timed out"),
    ("Reset", "Garbage", EndReason.RESET_FAILED, "observations must be a list"),
    ("Step", "Raises", EndReason.ENV_ERROR, "RuntimeError: environment bug"),
    ("Step", "Hangs", EndReason.ENV_TIMEOUT, "step timed out"),
    ("Step", "Garbage", EndReason.ENV_ERROR, "not StepResult"),
])
def test_a_misbehaving_environment_ends_the_episode_and_is_counted(stage, kind, reason, error, caplog):
    settings = EnvSettings(step_timeout_s=0.2, fallback_score=-1.0)
    with caplog.at_level(logging.ERROR):
        results, episode, runner = play(f"{M}:{kind}In{stage}", [calls(add(3)), FINAL], settings)
    assert episode.end_reason is reason
    assert any(error in e for e in episode.errors), episode.errors
    counted = episode.stats.env_timeouts if kind == "Hangs" else episode.stats.env_errors
    assert counted == 1
    assert runner.stats["env_timeouts" if kind == "Hangs" else "env_errors"] == 1
    assert error in caplog.text and "counter-3" in caplog.text
    if stage == "Reset":
        assert results == [] and episode.reward == -1.0 and episode.messages == []
    else:
        assert results[0].done and results[0].observations == []
        assert episode.turn_rewards == [0.0] and episode.stats.unanswered_calls == 1
        assert episode.reward == 0.0  # the outcome is still asked: the counter never moved


@pytest.mark.parametrize("kind", ["Raises", "Hangs", "Garbage"])
def test_a_failing_outcome_gets_the_fallback_score(kind):
    _, episode, _ = play(f"{M}:{kind}InOutcome", [calls(add(3)), FINAL],
                         EnvSettings(step_timeout_s=0.2, fallback_score=-1.0))
    assert episode.end_reason is EndReason.DONE and episode.reward == -1.0
    assert len(episode.errors) == 1 and episode.errors[0].startswith("outcome")


def test_reply_mode_answers_the_model_and_the_episode_goes_on():
    settings = EnvSettings(step_timeout_s=0.2, on_env_error="reply", max_turns=3)
    results, episode, _ = play(f"{M}:RaisesInStep", [calls(add(1)), FINAL, FINAL], settings)
    assert [r.done for r in results] == [False, False, True]
    assert results[0].observations[0]["role"] == "tool" and "environment failed" in results[0].observations[0][
        "content"]
    assert results[1].observations[0]["role"] == "user"  # no call to answer: a user message
    assert episode.end_reason is EndReason.MAX_TURNS and episode.stats.env_errors == 3


def test_max_turns_ends_the_episode_without_observations():
    results, episode, _ = play(f"{M}:Counter", [calls(add(1))] * 5, EnvSettings(max_turns=2))
    assert len(results) == 2 and results[-1].done and results[-1].observations == []
    assert episode.end_reason is EndReason.MAX_TURNS and episode.stats.turns == 2
    assert episode.turn_rewards == [0.1, 0.1]


def test_the_token_budget_counts_model_and_observation_tokens():
    results, episode, _ = play(f"{M}:Counter", [calls(add(1))] * 10, EnvSettings(max_tokens=24),
                               tokens_per_turn=5, observation_tokens=5)
    # 5+5, 5+5 -> 20 used, 4 left; the third turn (5 tokens) exhausts the budget before the environment's answer
    assert episode.end_reason is EndReason.TOKEN_BUDGET and len(results) == 3


def test_an_observation_that_would_exhaust_the_budget_is_not_appended():
    runner = EnvRunner(f"{M}:Counter", settings=EnvSettings(max_tokens=20))

    async def go():
        session = await runner.start(counter_task())
        await session.step(calls(add(1)), 5)
        assert session.tokens_left == 15
        assert not session.add_observation_tokens(15)  # would leave the model no token
        assert session.done and session.end_reason is EndReason.TOKEN_BUDGET
        return await session.finish()

    episode = asyncio.run(go())
    assert episode.stats.observation_tokens == 0


def test_the_episode_time_budget_bounds_the_environment_not_each_step():
    settings = EnvSettings(step_timeout_s=1.0, episode_timeout_s=0.4)
    results, episode, _ = play(f"{M}:SlowSteps", [calls(add(1))] * 5, settings)
    assert episode.end_reason is EndReason.EPISODE_TIMEOUT
    assert len(results) == 3 and episode.stats.env_timeouts == 1
    assert episode.stats.env_time_s == pytest.approx(0.4, abs=0.1)


def test_malformed_calls_are_answered_without_the_environment():
    bad = MalformedCall("c0", MalformedKind.BAD_JSON, "argument 'n' is not valid JSON", "<tool_call>...", "add", 0)
    runner = EnvRunner(f"{M}:Counter")

    async def go():
        session = await runner.start(counter_task())
        only_bad = await session.step(calls(malformed=[bad]), 5)
        mixed = await session.step(AssistantTurn("", (add(1, 1),), (
            MalformedCall("c0", MalformedKind.UNKNOWN_TOOL, "there is no tool 'mul'", "<tool_call>mul...", "mul", 0),
            MalformedCall("c2", MalformedKind.BAD_FORMAT, "not closed", "<tool_call>add", None, 2))), 5)
        return session, only_bad, mixed, await session.finish()

    session, only_bad, mixed, episode = asyncio.run(go())
    assert only_bad.observations == [{"role": "tool", "tool_call_id": "c0",
                                      "content": "Error: argument 'n' is not valid JSON"}]
    # in call order: the malformed call 0, the environment's answer to call 1, the malformed call 2
    assert [m["tool_call_id"] for m in mixed.observations] == ["c0", "c1", "c2"]
    assert mixed.observations[1]["content"] == "1"
    assert len(session.env.steps_seen) == 1 and session.env.steps_seen[0].malformed == ()
    assert episode.stats.tool_calls == 4 and episode.stats.malformed_calls == 3
    assert episode.stats.malformed == {"bad_json": 1, "unknown_tool": 1, "bad_format": 1}
    assert episode.stats.successful_calls == 1


def test_malformed_replies_follow_observations_that_cannot_be_interleaved():
    bad = MalformedCall("c1", MalformedKind.BAD_FORMAT, "not closed", "<tool_call>add", None, 1)
    results, _, _ = play(f"{M}:ExtraObservations", [AssistantTurn("", (add(1),), (bad,))])
    assert [m["role"] for m in results[0].observations] == ["tool", "user", "tool"]
    assert results[0].observations[-1]["tool_call_id"] == "c1"


def test_tool_errors_count_as_failed_calls():
    _, episode, _ = play(f"{M}:Counter", [calls(ToolCall("c0", "fail", {}, 0), add(3, 1)), FINAL])
    assert episode.stats.failed_calls == 1 and episode.stats.successful_calls == 1
    assert episode.messages[2]["content"] == "Error: this tool always fails"


def test_huge_observations_are_cut():
    results, _, _ = play(f"{M}:Chatty", [calls(add(1))], EnvSettings(max_observation_chars=100))
    content = results[0].observations[0]["content"]
    assert content.startswith("x" * 100) and "99900 characters cut" in content and len(content) < 200


def test_a_finished_session_refuses_more_steps_and_finish_is_idempotent():
    runner = EnvRunner(f"{M}:Counter")

    async def go():
        session = await runner.start(counter_task())
        await session.step(FINAL, 1)
        with pytest.raises(RuntimeError, match="is over"):
            await session.step(FINAL, 1)
        first = await session.finish()
        assert await session.finish() is first
        return session

    session = asyncio.run(go())
    assert session.env.closed


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_turns"):
        EnvSettings(max_turns=0)
    with pytest.raises(ValueError, match="on_env_error"):
        EnvSettings(on_env_error="ignore")
    with pytest.raises(ValueError, match="step_timeout_s"):
        EnvSettings(step_timeout_s=0)


def test_entry_point_environments_register_and_a_broken_one_is_skipped(monkeypatch, caplog):
    from importlib.metadata import EntryPoint

    import rewards.envs.registry as registry

    registry.registered_envs()  # built-ins first, as in a run
    points = [EntryPoint("ep_counter", f"{M}:Counter", registry.ENTRY_POINT_GROUP),
              EntryPoint("ep_broken", f"{M}:NoSuchClass", registry.ENTRY_POINT_GROUP),
              EntryPoint("ep_not_env", f"{M}:NotAnEnvironment", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: points if group == registry.ENTRY_POINT_GROUP
                        else [])
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with caplog.at_level(logging.ERROR):
        names = registry.registered_envs()
    assert "ep_counter" in names and "calculator" in names
    assert "ep_broken" not in names and "ep_not_env" not in names
    assert "environment 'ep_broken'" in caplog.text and "environment 'ep_not_env'" in caplog.text
    _, episode, _ = play("ep_counter", [calls(add(3)), FINAL])
    assert episode.reward == 1.0
