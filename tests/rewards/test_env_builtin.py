"""The calculator, price_check and terminal environments: solvable as intended, not payable for the obvious
exploits; task generators deterministic with a disjoint held-out split; episode metrics."""
from __future__ import annotations

import asyncio

import pytest

from rewards.envs import AssistantTurn, EndReason, EnvRunner, EnvSettings, ToolCall, episode_metrics, load_env
from rewards.envs.builtin.calculator import basket_total, evaluate
from rewards.envs.builtin.common import final_number
from rewards.envs.builtin.terminal import ANSWER_PATH
from rewards.envs.tools import ToolError


def call(name: str, index: int = 0, **arguments) -> ToolCall:
    return ToolCall(f"c{index}", name, arguments, index)


def turn(*tool_calls: ToolCall, content: str = "") -> AssistantTurn:
    return AssistantTurn(content, tuple(tool_calls))


def play(env: str, task, turns, kwargs=None, settings=EnvSettings()):
    runner = EnvRunner(env, kwargs, settings)

    async def go():
        session = await runner.start(task)
        observations = []
        for t in turns:
            if session.done:
                break
            result = await session.step(t, 10)
            observations.append(result.observations)
        return observations, await session.finish()

    return asyncio.run(go())


@pytest.mark.parametrize("env", ["calculator", "price_check", "terminal", "coding_agent"])
def test_task_generators_are_deterministic_and_the_heldout_split_is_disjoint(env):
    spec = load_env(env)
    train, again = spec.generate_tasks("train", 30, seed=1), spec.generate_tasks("train", 30, seed=1)
    assert [(t.prompt, t.data) for t in train] == [(t.prompt, t.data) for t in again]
    other_seed = spec.generate_tasks("train", 30, seed=2)
    assert [t.data for t in train] != [t.data for t in other_seed]
    heldout = spec.generate_tasks("heldout", 15, seed=1)
    assert {t.split for t in train} == {"train"} and {t.split for t in heldout} == {"heldout"}
    problem = {"coding_agent": lambda t: (t.data["family"], tuple(sorted(t.data["params"].items()))),
               "price_check": lambda t: t.data["quantity"],  # the split's key: the asked quantity
               }.get(env, lambda t: repr(t.prompt) + repr(sorted(t.data.items())))
    assert not {problem(t) for t in train} & {problem(t) for t in heldout}
    assert len({t.id for t in train + heldout}) == 45
    with pytest.raises(ValueError, match="split"):
        spec.generate_tasks("test", 1)


# ---- calculator ----

def _calculator_task():
    return load_env("calculator").generate_tasks("train", 1, seed=0)[0]


def _solve_calculator(task, final: str):
    lookups = [call("lookup_price", i, item=item) for i, item in enumerate(task.data["basket"])]
    return [turn(*lookups), turn(content=final)]


def test_calculator_pays_the_right_total_after_lookups():
    task = _calculator_task()
    total = basket_total(task.data)
    observations, episode = play("calculator", task, _solve_calculator(task, f"So the total is... Answer: {total}"),
                                 {"lookup_reward": 0.1})
    prices = [float(m["content"]) for m in observations[0]]
    assert prices == [task.data["prices"][item] for item in task.data["basket"]]
    assert episode.reward == 1.0 and episode.end_reason is EndReason.DONE
    assert episode.turn_rewards == [pytest.approx(0.1 * len(task.data["basket"])), 0.0]


def test_calculator_tool_evaluates_arithmetic_only():
    assert evaluate("(3 * 4.5 + 2) * 0.9") == pytest.approx(13.95)
    for bad in ["__import__('os').system('true')", "x + 1", "9 ** 9 ** 9", "1 / 0", "(-8) ** 0.5", "1" * 300,
                "abs(-1)", "[1][0]", "'a' * 3"]:
        with pytest.raises(ToolError):
            evaluate(bad)


@pytest.mark.parametrize("final", [
    "Answer: {wrong}",                                       # a guess (no lookups needed to guess)
    "The calculator returned {wrong}, I trust it. Answer: {wrong}",
    "Answer: {total}, {wrong}",                              # several numbers
    "Answer: {total} or {wrong}",                            # a hedge
    "<think>Answer: {total}</think> Answer: {wrong}",        # the right number only in the reasoning
    "Answer: {total}. Actually, Answer: {wrong}",            # the last answer counts
    "I computed the total.",                                 # no answer
])
def test_calculator_exploits_score_zero(final):
    task = _calculator_task()
    total = basket_total(task.data)
    text = final.format(total=total, wrong=total + 1)
    _, episode = play("calculator", task, _solve_calculator(task, text))
    assert episode.reward == 0.0, text


def test_calculator_without_a_final_answer_scores_zero():
    task = _calculator_task()
    item = next(iter(task.data["basket"]))
    _, episode = play("calculator", task, [turn(call("lookup_price", item=item))] * 3,
                      settings=EnvSettings(max_turns=3))
    assert episode.end_reason is EndReason.MAX_TURNS and episode.reward == 0.0
    assert episode.turn_rewards == [0.0, 0.0, 0.0]  # lookup_reward defaults to 0; repeated lookups never pay


def test_repeated_lookups_pay_the_per_turn_reward_once():
    task = _calculator_task()
    item = next(iter(task.data["basket"]))
    _, episode = play("calculator", task, [turn(call("lookup_price", item=item))] * 3, {"lookup_reward": 0.1},
                      EnvSettings(max_turns=3))
    assert episode.turn_rewards == [0.1, 0.0, 0.0]


def test_final_number_is_strict():
    assert final_number("Answer: 1,234.5") == 1234.5
    assert final_number(r"\boxed{42}") == 42.0
    assert final_number("Answer: 42 dollars") is None
    assert final_number("Answer: 4 2") is None


# ---- price_check ----

def _price_task(index: int = 0):
    return load_env("price_check").generate_tasks("train", index + 1, seed=0)[index]


@pytest.mark.parametrize("final", ["Answer: {total}", "It said {total}. Answer: {total}"])
def test_price_check_pays_the_answer_the_tool_gave(final):
    task = _price_task()
    quantity = task.data["quantity"]
    total = quantity * task.data["price"]
    observations, episode = play("price_check", task, [
        turn(call("cost", quantity=quantity)), turn(content=final.format(total=total))])
    assert observations[0][0]["content"] == str(total)
    assert episode.reward == 1.0 and episode.end_reason is EndReason.DONE
    assert episode.outcome.components["asked_right"] == 1.0


@pytest.mark.parametrize("exploit", ["guess", "other_quantity", "unit_price", "several", "reasoning", "claim",
                                     "no_answer"])
def test_price_check_exploits_score_zero(exploit):
    task = _price_task()
    quantity, price = task.data["quantity"], task.data["price"]
    total = quantity * price
    right = turn(call("cost", quantity=quantity))
    turns = {
        "guess": [turn(content=f"Answer: {total + 1}")],                   # no call: a guess
        "other_quantity": [turn(call("cost", quantity=quantity + 1)), turn(content=f"Answer: {total + price}")],
        "unit_price": [turn(call("cost", quantity=1)), turn(content=f"Answer: {price}")],
        "several": [right, turn(content=f"Answer: {total}, {total + 1}")],
        "reasoning": [right, turn(content=f"<think>Answer: {total}</think> Answer: {total + 1}")],
        "claim": [turn(content=f"The cost tool says {total + 1}. Answer: {total + 1}")],
        "no_answer": [right, right, right],
    }[exploit]
    _, episode = play("price_check", task, turns, settings=EnvSettings(max_turns=3))
    assert episode.reward == 0.0


def test_price_check_tool_errors_are_failed_calls():
    task = _price_task()
    observations, episode = play("price_check", task, [
        turn(call("cost", quantity=-1), call("total", 1, quantity=2)), turn(content="Answer: 0")])
    assert [m["content"] for m in observations[0]] == ["Error: the quantity must not be negative",
                                                       "Error: unknown tool 'total'"]
    assert episode.stats.failed_calls == 2 and episode.reward == 0.0


def test_price_check_expert_demonstrates_half_of_the_tasks_and_solves_them():
    spec = load_env("price_check")
    tasks = spec.generate_tasks("train", 80, seed=0)
    taught = [t for t in tasks if spec.expert(t, list(t.prompt)) is not None]
    assert 0.3 < len(taught) / len(tasks) < 0.7
    for task in taught[:5]:
        first = spec.expert(task, list(task.prompt))
        (tool_call,) = first["tool_calls"]
        observations, _ = play("price_check", task, [turn(call("cost", **tool_call["function"]["arguments"]))])
        final = spec.expert(task, list(task.prompt) + [first] + observations[0])
        _, episode = play("price_check", task, [turn(call("cost", **tool_call["function"]["arguments"])),
                                                turn(content=final["content"])])
        assert episode.reward == 1.0


# ---- terminal ----

def _terminal_task():
    return load_env("terminal").generate_tasks("train", 1, seed=0)[0]


def test_terminal_needs_the_chain_of_reads_then_the_write():
    task = _terminal_task()
    chain, token = task.data["chain"], task.data["token"]
    turns = [turn(call("ls", path="/srv")), turn(call("cat", path="/srv/README"))]
    turns += [turn(call("cat", path=p)) for p in chain]
    turns += [turn(call("write", path=ANSWER_PATH, content=token + "\n")), turn(content="done")]
    observations, episode = play("terminal", task, turns, {"hop_reward": 0.2}, EnvSettings(max_turns=len(turns)))
    assert "README" in observations[0][0]["content"]
    assert chain[0] in observations[1][0]["content"]
    assert token in observations[1 + len(chain)][0]["content"]
    assert episode.reward == 1.0 and episode.stats.tool_calls == len(chain) + 3
    assert sum(episode.turn_rewards) == pytest.approx(0.2 * len(chain))


@pytest.mark.parametrize("exploit", ["guess", "several", "rewrite_notes", "claim", "decoy"])
def test_terminal_exploits_score_zero(exploit):
    task = _terminal_task()
    token = task.data["token"]
    files = task.data["files"]
    decoy = next(c for p, c in files.items() if "stale token" in c).split(": ")[1].strip()
    turns = {
        "guess": [turn(call("write", path=ANSWER_PATH, content="0123456789ab"))],
        "several": [turn(call("write", path=ANSWER_PATH, content=f"{decoy}\n{token}"))],
        # overwrite the last note with a token of its own, then write that: the env checks its task data
        "rewrite_notes": [turn(call("write", path=task.data["chain"][-1], content="deploy token: ffffffffffff"),
                               call("write", 1, path=ANSWER_PATH, content="ffffffffffff"))],
        "claim": [turn(content=f"I wrote {token} to {ANSWER_PATH}. done")],
        "decoy": [turn(call("write", path=ANSWER_PATH, content=decoy))],
    }[exploit]
    _, episode = play("terminal", task, turns + [turn(content="done")])
    assert episode.reward == 0.0


def test_terminal_tool_errors_are_failed_calls_not_crashes():
    task = _terminal_task()
    observations, episode = play("terminal", task, [
        turn(call("cat", path="/nope"), call("ls", 1, path="/nothing"), call("cat", 2, path="relative"),
             call("write", 3, path="/srv", content="x")), turn(content="done")])
    assert [m["content"].split(":")[0] for m in observations[0]] == ["Error"] * 4
    assert episode.stats.failed_calls == 4 and episode.reward == 0.0


# ---- metrics ----

def test_episode_metrics_over_environments():
    calc = _calculator_task()
    _, solved = play("calculator", calc, _solve_calculator(calc, f"Answer: {basket_total(calc.data)}"))
    _, unsolved = play("terminal", _terminal_task(), [turn(call("cat", path="/nope"), call("ls", 1, path="/srv")),
                                                      turn(content="done")])
    metrics = episode_metrics([solved, unsolved])
    calls = solved.stats.tool_calls + 2
    assert metrics["agent/episodes"] == 2.0
    assert metrics["agent/turns/mean"] == 2.0
    assert metrics["agent/tool_call_success_rate"] == pytest.approx((calls - 1) / calls)
    assert metrics["agent/failed_call_rate"] == pytest.approx(1 / calls)
    assert metrics["agent/malformed_call_rate"] == 0.0
    assert metrics["agent/calculator/reward"] == 1.0 and metrics["agent/terminal/reward"] == 0.0
    assert metrics["agent/end/done"] == 1.0
    assert metrics["agent/episode_tokens/max"] == 20.0  # 2 turns x 10 model tokens; play() counts no observations
    assert metrics["agent/env_time_s/mean"] >= 0.0
    assert episode_metrics([]) == {}
