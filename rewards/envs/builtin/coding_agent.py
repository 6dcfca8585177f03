"""`coding_agent`: write a function, run the visible tests as a tool, fix, submit.

Tools: `run_tests(code)` runs the task's visible tests on the code in the sandbox of the `coding` reward (the same
call, so the same isolation: rewards/builtin/coding.py) and reports each test's status; `submit(code)` ends the
episode. Outcome: the pass fraction of the submitted code on the hidden tests (more cases than the visible ones,
never shown to the model), or 1/0 with `all_or_nothing`. No submission scores 0, whatever the model claims; code
that special-cases the visible tests fails the hidden ones.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

from rewards.api import RewardInput, RewardResult
from rewards.builtin.coding import coding
from rewards.envs.api import AssistantTurn, Message, StepResult, Task, ToolCall
from rewards.envs.builtin.common import draw_tasks
from rewards.envs.registry import register_env
from rewards.envs.tools import ToolEnvironment, ToolError, function_tool

MAX_CODE_CHARS = 20_000
TOOLS = [
    function_tool("run_tests", "Runs the visible tests on your code and reports each one.",
                  {"code": {"type": "string", "description": "the complete Python module"}}),
    function_tool("submit", "Submits your final code; this ends the task.",
                  {"code": {"type": "string", "description": "the complete Python module"}}),
]


@dataclass(frozen=True)
class _Family:
    spec: Callable[[dict], str]
    params: Callable[[random.Random], dict]
    inputs: Callable[[random.Random, dict], tuple]
    reference: Callable[[dict, tuple], Any]


def _rand_list(rng: random.Random, low: int = -20, high: int = 20, max_len: int = 8) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(0, max_len))]


def _rotate(p: dict, args: tuple) -> list:
    xs = args[0]
    k = p["k"] % len(xs) if xs else 0
    return xs[k:] + xs[:k]


def _fizz(p: dict, args: tuple) -> list:
    a, b = p["a"], p["b"]
    return ["FizzBuzz" if i % a == 0 and i % b == 0 else "Fizz" if i % a == 0 else "Buzz" if i % b == 0 else str(i)
            for i in range(1, args[0] + 1)]


FAMILIES = {
    "sum_above": _Family(
        lambda p: f"solve(xs) returns the sum of the elements of the list xs that are greater than {p['k']}.",
        lambda rng: {"k": rng.randint(-10, 30)},
        lambda rng, p: (_rand_list(rng, -40, 40),),
        lambda p, args: sum(x for x in args[0] if x > p["k"])),
    "count_char": _Family(
        lambda p: f"solve(s) returns how many times the letter {p['c']!r} occurs in the string s, ignoring case.",
        lambda rng: {"c": rng.choice("abcdefghijklmnopqrstuvwxyz")},
        lambda rng, p: ("".join(rng.choice(p["c"] + p["c"].upper() + "aeiostr ")
                                for _ in range(rng.randint(0, 14))),),
        lambda p, args: args[0].lower().count(p["c"])),
    "rotate": _Family(
        lambda p: f"solve(xs) returns the list xs rotated left by {p['k']} positions (the first {p['k']} elements, "
                  "taken modulo the length, move to the end); an empty list stays empty.",
        lambda rng: {"k": rng.randint(1, 20)},
        lambda rng, p: (_rand_list(rng, 0, 9),),
        _rotate),
    "fizzbuzz": _Family(
        lambda p: f"solve(n) returns a list of strings for 1..n: 'FizzBuzz' for multiples of both {p['a']} and "
                  f"{p['b']}, 'Fizz' for multiples of {p['a']}, 'Buzz' for multiples of {p['b']}, else the number.",
        lambda rng: dict(zip("ab", rng.sample(range(2, 10), 2))),
        lambda rng, p: (rng.randint(0, 20),),
        _fizz),
}
VISIBLE_TESTS = 2
HIDDEN_TESTS = 8


def _test(p: dict, family: _Family, args: tuple) -> str:
    return f"assert solve({', '.join(repr(a) for a in args)}) == {family.reference(p, args)!r}"


def _candidate(rng: random.Random):
    name = rng.choice(sorted(FAMILIES))
    family = FAMILIES[name]
    params = family.params(rng)
    cases: list[tuple] = []
    for _ in range(200):
        if len(cases) == VISIBLE_TESTS + HIDDEN_TESTS:
            break
        args = family.inputs(rng, params)
        if args not in cases:
            cases.append(args)
    tests = [_test(params, family, args) for args in cases]
    visible, hidden = tests[:VISIBLE_TESTS], tests  # the hidden set includes the visible cases and more
    key = json.dumps([name, params], sort_keys=True)
    prompt = [{"role": "user", "content": (
        f"Write a Python function: {family.spec(params)}\nVisible tests:\n" + "\n".join(visible) +
        "\nUse run_tests(code) to check your code, fix it if needed, then submit(code). Only submitted code counts,"
        " and it is graded on more tests than the visible ones.")}]
    data = {"family": name, "params": params, "visible_tests": visible, "hidden_tests": hidden}
    return key, lambda task_id: Task(task_id, prompt, TOOLS, data)


def generate_tasks(split: str, count: int, seed: int = 0) -> list[Task]:
    """Splits are by (family, parameters): a held-out task asks for a function no training task asks for."""
    return draw_tasks("coding_agent", split, count, seed, _candidate)


@register_env("coding_agent", tasks=generate_tasks)
class CodingAgentEnv(ToolEnvironment):
    def __init__(self, timeout_s: float = 5.0, all_or_nothing: bool = False):
        self.timeout_s, self.all_or_nothing = float(timeout_s), bool(all_or_nothing)

    async def reset(self, task: Task) -> list[Message]:
        self.data = task.data
        self.submitted: str | None = None
        self.done = False
        return [dict(m) for m in task.prompt]

    async def _run(self, code: str, tests: list[str]) -> RewardResult:
        if len(code) > MAX_CODE_CHARS:
            raise ToolError(f"code longer than {MAX_CODE_CHARS} characters")
        return await coding(RewardInput(prompt="", response=code, label={"tests": tests}), timeout_s=self.timeout_s,
                            all_or_nothing=self.all_or_nothing)

    async def call_tool(self, call: ToolCall) -> str:
        if call.name == "run_tests":
            result = await self._run(call.arguments["code"], self.data["visible_tests"])
            lines = [f"{int(result.components['passed'])}/{int(result.components['total'])} tests passed"]
            for test, case in zip(self.data["visible_tests"], result.info["cases"]):
                lines.append(f"{case['status']}: {test}" + (f"  ({case['detail'][:200]})" if case["detail"] else ""))
            return "\n".join(lines)
        if call.name == "submit":
            if len(call.arguments["code"]) > MAX_CODE_CHARS:
                raise ToolError(f"code longer than {MAX_CODE_CHARS} characters")
            self.submitted, self.done = call.arguments["code"], True
            return "Submitted."
        raise ToolError(f"unknown tool {call.name!r}")

    async def finish_turn(self, turn: AssistantTurn) -> StepResult:
        # Text without a call is no submission: the episode ends, and its outcome is 0.
        return StepResult([], done=True)

    async def outcome(self) -> RewardResult:
        if self.submitted is None:
            return RewardResult(0.0, {"submitted": 0.0, "pass_fraction": 0.0}, {"reason": "nothing submitted"})
        result = await self._run(self.submitted, self.data["hidden_tests"])
        return RewardResult(result.score, {"submitted": 1.0, "pass_fraction": result.components["pass_fraction"]},
                            {"cases": result.info["cases"]})
