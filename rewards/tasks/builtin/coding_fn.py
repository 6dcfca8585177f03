"""`coding_fn`: write a one-line Python function of one integer, checked by the `coding` reward's unit tests in
the sandbox (the judge runs the tests; the solution only answers calls, see rewards/builtin/coding.py).

A task is an operation with a constant ("returns x plus 7", "returns True when x is greater than 12"); the split is
decided by that pair, so held-out tasks combine operations and constants no training task combines. Tests call
the function on fixed inputs (a negative one included) and on the constant and its neighbours, so a solution with
the wrong operation or an off-by-one constant fails. Demonstrations: the one-line body for half of the training tasks (the warm-up teaches the format
and most operations; RL is meant to generalise the rest)."""
from __future__ import annotations

import random

from rewards.envs.api import Task
from rewards.envs.builtin.common import draw_tasks, prompt_bucket
from rewards.tasks.registry import TaskFamily, register_task_family

NAME = "coding_fn"
# (operation, wording with {k}, expression with {k}, python function computing it, constants)
# Wide ranges of constants: a policy can only solve the held-out pairs by copying the constant from the prompt,
# not by recalling the constants it was shown.
OPERATIONS = {
    "add": ("x plus {k}", "x + {k}", lambda x, k: x + k, range(1, 100)),
    "sub": ("x minus {k}", "x - {k}", lambda x, k: x - k, range(1, 100)),
    "mul": ("x times {k}", "x * {k}", lambda x, k: x * k, range(2, 31)),
    "floordiv": ("x divided by {k}, rounded down", "x // {k}", lambda x, k: x // k, range(2, 31)),
    "mod": ("the remainder of x divided by {k}", "x % {k}", lambda x, k: x % k, range(2, 31)),
    "gt": ("True when x is greater than {k}, else False", "x > {k}", lambda x, k: x > k, range(0, 100)),
    "max": ("the larger of x and {k}", "max(x, {k})", lambda x, k: max(x, k), range(0, 100)),
    "min": ("the smaller of x and {k}", "min(x, {k})", lambda x, k: min(x, k), range(0, 100)),
    "square_add": ("x squared plus {k}", "x * x + {k}", lambda x, k: x * x + k, range(1, 61)),
}
INPUTS = (-7, 0, 3, 11, 40)
DEMONSTRATED_FRACTION = 0.5


def _candidate(rng: random.Random):
    op = rng.choice(sorted(OPERATIONS))
    wording, expression, fn, constants = OPERATIONS[op]
    k = rng.choice(list(constants))
    prompt = (f"Write a Python function f(x) that returns {wording.format(k=k)}. Reply with the code only.")
    # Around the constant too: a comparison or max/min with the constant off by one fails there.
    tests = [f"assert f({x}) == {fn(x, k)!r}" for x in sorted(set(INPUTS) | {k - 1, k, k + 1})]

    def build(task_id: str) -> Task:
        return Task(task_id, [{"role": "user", "content": prompt}], [],
                    {"tests": tests, "solution": f"def f(x):\n    return {expression.format(k=k)}\n"})
    return f"{op}|{k}", build


def generate(split: str, count: int, seed: int = 0) -> list[Task]:
    return draw_tasks(NAME, split, count, seed, _candidate)


def demonstrate(task: Task) -> str | None:
    bucket = prompt_bucket(task)
    return task.data["solution"] if bucket < DEMONSTRATED_FRACTION else None


FAMILY = register_task_family(TaskFamily(NAME, generate, reward="coding", reward_kwargs={},
                                         demonstrate=demonstrate))
