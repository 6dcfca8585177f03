"""The coding-agent environment: tests run through the coding reward's sandbox as a tool; only submitted code on
the hidden tests is paid. Each case runs the sandbox (about a second per run on 2 cores)."""
from __future__ import annotations

import asyncio

import pytest

from rewards.envs import AssistantTurn, EndReason, EnvRunner, EnvSettings, ToolCall, load_env
from rewards.envs.builtin.coding_agent import FAMILIES


def _task():
    spec = load_env("coding_agent")
    return next(t for t in spec.generate_tasks("train", 20, seed=0) if t.data["family"] == "sum_above")


def _solution(task) -> str:
    return f"def solve(xs):\n    return sum(x for x in xs if x > {task.data['params']['k']})\n"


def play(turns, kwargs=None):
    runner = EnvRunner("coding_agent", kwargs, EnvSettings(step_timeout_s=60, max_turns=len(turns)))
    task = _task()

    async def go():
        session = await runner.start(task)
        observations = []
        for i, content_or_calls in enumerate(turns):
            if session.done:
                break
            turn = AssistantTurn(content_or_calls) if isinstance(content_or_calls, str) else AssistantTurn(
                "", tuple(ToolCall(f"c{i}_{j}", name, {"code": code}, j)
                          for j, (name, code) in enumerate(content_or_calls)))
            observations.append((await session.step(turn, 10)).observations)
        return observations, await session.finish()

    return task, *asyncio.run(go())


def test_write_run_fix_submit():
    task = _task()
    _, observations, episode = play([
        [("run_tests", "def solve(xs):\n    return sum(xs)\n")],
        [("run_tests", _solution(task))],
        [("submit", _solution(task))],
    ])
    first, second = observations[0][0]["content"], observations[1][0]["content"]
    assert second.startswith("2/2 tests passed")
    assert first.startswith(("0/2", "1/2")) and "fail" in first
    assert observations[2] == []  # submit ends the episode: nothing more is shown to the model
    assert episode.end_reason is EndReason.DONE and episode.reward == 1.0
    assert episode.outcome.components["pass_fraction"] == 1.0
    # the hidden tests never reach the model
    hidden_only = set(task.data["hidden_tests"]) - set(task.data["visible_tests"])
    assert not any(t in m["content"] for t in hidden_only for obs in observations for m in obs)


def _special_cased(task) -> str:
    """Passes the visible tests by table lookup, and nothing else."""
    answers = {}
    for test in task.data["visible_tests"]:
        call, expected = test[len("assert solve("):].rsplit(") == ", 1)
        answers[call] = expected
    body = "".join(f"    if repr(xs) == {k!r}:\n        return {v}\n" for k, v in answers.items())
    return f"def solve(xs):\n{body}    return None\n"


@pytest.mark.parametrize("exploit", ["special_case", "unsolved_submit", "claim", "tested_not_submitted"])
def test_coding_agent_exploits(exploit):
    task = _task()
    turns = {
        "special_case": [[("submit", _special_cased(task))]],
        "unsolved_submit": [[("submit", "def solve(xs):\n    return None\n")]],
        "claim": ["I wrote solve and all tests pass.\n```python\n" + _solution(task) + "```"],
        "tested_not_submitted": [[("run_tests", _solution(task))], "All tests pass, done."],
    }[exploit]
    _, observations, episode = play(turns, {"all_or_nothing": True})
    assert episode.reward == 0.0, (exploit, episode.outcome)
    if exploit == "special_case":
        assert episode.outcome.components["pass_fraction"] == pytest.approx(
            len(task.data["visible_tests"]) / len(task.data["hidden_tests"]))


def test_every_familys_tests_hold_for_its_reference_and_fail_for_a_wrong_one():
    """The tests are generated from each family's reference; they must hold for it (repr round trip, argument
    shapes) and be strong enough that a constant answer fails some hidden test."""
    tasks = load_env("coding_agent").generate_tasks("train", 40, seed=3)
    for name, family in FAMILIES.items():
        task = next(t for t in tasks if t.data["family"] == name)
        params = task.data["params"]
        for test in task.data["hidden_tests"]:
            exec(test, {"solve": lambda *args: family.reference(params, args)})
        constant = family.reference(params, family.inputs(__import__("random").Random(0), params))
        failures = 0
        for test in task.data["hidden_tests"]:
            try:
                exec(test, {"solve": lambda *args: constant})
            except AssertionError:
                failures += 1
        assert failures > 0, name
