"""The verifiers adapter: a small verifiers (0.4.0, v1) environment defined in tests/rewards/vf_tiny_taskset.py runs
through our interface in a worker process.

verifiers 0.4.0 cannot be installed beside sglang 0.5.23 (it needs openai>=2.54, sglang pins openai==2.8.0), so the
worker runs under another interpreter: SLIPSTREAM_VERIFIERS_PYTHON, one with `pip install verifiers==0.4.0`. Without
it the tests that need verifiers skip; the start-up failure test runs everywhere."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from rewards.envs import AssistantTurn, EndReason, EnvRunner, EnvSettings, ToolCall
from rewards.envs.verifiers_env import close_workers, taskset_tasks

HERE = str(Path(__file__).parent)
PYTHON = os.environ.get("SLIPSTREAM_VERIFIERS_PYTHON", "")
needs_verifiers = pytest.mark.skipif(
    not PYTHON, reason="set SLIPSTREAM_VERIFIERS_PYTHON to an interpreter with verifiers==0.4.0 (it cannot share "
                       "this environment with sglang 0.5.23: openai pins)")


def runner(python: str = PYTHON) -> EnvRunner:
    return EnvRunner("verifiers", {"taskset": "vf_tiny_taskset", "python": python, "sys_path": [HERE]},
                     EnvSettings(step_timeout_s=120, max_turns=4))


def add(a: int, b: int, call_id: str = "call_0_0") -> AssistantTurn:
    return AssistantTurn("", (ToolCall(call_id, "add", {"a": a, "b": b}, 0),))


async def play(run: EnvRunner, index: int, turns: list[AssistantTurn]):
    session = await run.start(taskset_tasks(1, start=index)[0])
    results = []
    for turn in turns:
        if session.done:
            break
        results.append(await session.step(turn, 5))
    return session, results, await session.finish()


@needs_verifiers
def test_verifiers_episodes_run_through_the_interface():
    run = runner()

    async def go():
        # one worker serves every episode; two of them run at once, interleaved
        first, second = await asyncio.gather(
            play(run, 0, [add(2, 3), AssistantTurn("The sum is 5")]),
            play(run, 1, [add(40, 2), AssistantTurn("The sum is 41")]))
        crashed = await play(run, 2, [add(7, 8)])
        missing = await play(run, 99, [])
        await close_workers()
        return first, second, crashed, missing

    first, second, crashed, missing = asyncio.run(go())
    session, results, episode = first
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert session.messages[1]["content"] == "What is 2 + 3? Use the add tool."
    assert [t["function"]["name"] for t in session.tools] == ["add"]
    assert results[0].observations == [{"role": "tool", "content": "5", "tool_call_id": "call_0_0"}]
    assert results[1].done and episode.end_reason is EndReason.DONE
    assert episode.reward == 1.0 and episode.outcome.components["rewards/correct"] == 1.0
    assert second[2].reward == 0.0 and second[2].outcome.components["ok"] == 1.0  # answered 41: wrong
    # a harness that crashes is a failed verifiers episode: done, outcome 0, the error kept
    _, _, crashed_episode = crashed
    assert crashed_episode.end_reason is EndReason.RESET_FAILED and crashed_episode.reward == 0.0
    assert any("harness program crashed" in e for e in crashed_episode.errors)
    assert missing[2].end_reason is EndReason.RESET_FAILED
    assert any("out of range" in e for e in missing[2].errors)


@needs_verifiers
def test_a_dead_worker_fails_its_episodes_cleanly():
    run = runner()

    async def go():
        session = await run.start(taskset_tasks(1)[0])
        session.env.worker.kill()
        result = await session.step(add(2, 3), 5)
        finished = await session.finish()
        await close_workers()
        return result, finished

    result, episode = asyncio.run(go())
    assert result.done and episode.end_reason is EndReason.ENV_ERROR
    assert any("worker died" in e for e in episode.errors)


def test_an_interpreter_without_verifiers_fails_the_reset_with_the_reason():
    """This interpreter has no verifiers (the sglang pins): the worker reports it, the episode never starts."""
    try:
        import verifiers  # noqa: F401
        pytest.skip("verifiers is importable here")
    except ImportError:
        pass
    import sys

    async def go():
        try:
            return await play(runner(sys.executable), 0, [])
        finally:
            await close_workers()

    _, _, episode = asyncio.run(go())
    assert episode.end_reason is EndReason.RESET_FAILED
    assert any("No module named 'verifiers'" in e for e in episode.errors), episode.errors
