"""Environments for the runner tests: one that behaves (a counter game), and ones that raise, hang, block on
nothing, or return garbage at each stage. Loaded by dotted path as `tests.rewards.envs_misbehaving:<Class>`."""
from __future__ import annotations

import asyncio

from rewards import RewardResult
from rewards.envs import AssistantTurn, Environment, StepResult, Task, ToolEnvironment, ToolError, function_tool

COUNTER_TOOLS = [function_tool("add", "Adds n to the counter.", {"n": {"type": "integer"}}),
                 function_tool("fail", "Always fails.", {})]


def counter_task(target: int = 3) -> Task:
    return Task(f"counter-{target}", [{"role": "user", "content": f"Bring the counter to {target}."}],
                COUNTER_TOOLS, {"target": target})


class Counter(ToolEnvironment):
    """add(n) adds to a counter; a turn without calls ends the episode; outcome 1 when the counter hit the target.
    Each turn that adds is rewarded 0.1 (a per-turn reward to check the plumbing)."""

    def __init__(self, turn_reward: float = 0.1):
        self.reward_per_turn = turn_reward
        self.steps_seen: list[AssistantTurn] = []

    async def reset(self, task: Task):
        self.target, self.value, self.closed = task.data["target"], 0, False
        return list(task.prompt)

    async def step(self, turn: AssistantTurn) -> StepResult:
        self.steps_seen.append(turn)
        return await super().step(turn)

    async def call_tool(self, call):
        if call.name == "fail":
            raise ToolError("this tool always fails")
        self.value += call.arguments["n"]
        return str(self.value)

    def turn_reward(self, turn):
        return self.reward_per_turn

    async def finish_turn(self, turn):
        return StepResult([], done=True)

    async def outcome(self):
        return RewardResult(float(self.value == self.target), {"value": float(self.value)})

    async def close(self):
        self.closed = True


class _Stage(Counter):
    stage = ""

    async def misbehave(self):
        raise NotImplementedError

    async def reset(self, task):
        messages = await super().reset(task)
        if self.stage == "reset":
            return await self.misbehave()
        return messages

    async def step(self, turn):
        if self.stage == "step":
            return await self.misbehave()
        return await super().step(turn)

    async def outcome(self):
        if self.stage == "outcome":
            return await self.misbehave()
        return await super().outcome()


def _variants():
    behaviours = {
        "Raises": lambda self: _raise(),
        "Hangs": lambda self: asyncio.sleep(3600),
        "Garbage": lambda self: _garbage(),
    }
    made = {}
    for stage in ("reset", "step", "outcome"):
        for kind, fn in behaviours.items():
            name = f"{kind}In{stage.capitalize()}"
            made[name] = type(name, (_Stage,), {"stage": stage, "misbehave": fn})
    return made


async def _raise():
    raise RuntimeError("environment bug")


async def _garbage():
    return {"not": "a StepResult"}


globals().update(_variants())


class SlowSteps(Counter):
    """Each step takes 0.15 s: within a 1 s step timeout, but a 0.4 s episode budget runs out on the third."""

    async def step(self, turn):
        await asyncio.sleep(0.15)
        return await super().step(turn)


class Chatty(Counter):
    """Answers every call with a 100 000-character observation."""

    async def call_tool(self, call):
        return "x" * 100_000


class NotAnEnvironment:
    async def reset(self, task):
        return []


def make_counter(turn_reward: float = 0.1) -> Environment:
    """A factory function (not a class), as a config may name one."""
    return Counter(turn_reward)


class ExtraObservations(Counter):
    """Answers each call and then adds a user note, so replies cannot be interleaved one-to-one."""

    async def step(self, turn):
        result = await super().step(turn)
        result.observations.append({"role": "user", "content": "note"})
        return result
