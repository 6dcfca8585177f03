"""`price_check`: what do N of the shop's item cost? One tool, `cost(quantity)`, knows the task's hidden unit
price; the model calls it, then answers in a turn without tool calls ending "Answer: <number>".

The smallest multi-turn tool task: a tool call whose argument comes from the prompt, an observation, and a final
answer that only the observation gives away. Built for the quickstart, where the tiny model on 2 CPU cores
cannot afford the calculator's episodes (two tools, several lookups and the arithmetic): an episode here is one
tool call and two short turns, and what the model must learn is to copy the asked quantity into the call and the
tool's result into the answer, for quantities it was never shown.

Outcome: 1 when the final answer equals quantity x unit price for the quantity asked, else 0. The price is drawn
per task and only the tool reveals it, so an answer without a call is a guess; a call for another quantity (the
unit price included) returns another number, and copying that scores 0; what the model says the tool returned,
several numbers in the answer and an episode that ends before a final answer score 0. The split is decided by the
quantity, so a held-out task asks for a quantity no training task asks for. Quantities run to 999, so that few
training tasks share one: with 2-99, each quantity was asked ~2.5 times and at some seeds the model learned the
training quantities' calls by heart, calling `cost` with the wrong quantity on every held-out task.
Demonstrations: the expert plays half of the training tasks (as coding_fn's demonstrations; the warm-up teaches the
format, RL the rest).
"""
from __future__ import annotations

import random

from rewards.api import RewardResult
from rewards.envs.api import AssistantTurn, Message, StepResult, Task, ToolCall
from rewards.envs.builtin.common import draw_tasks, final_number, numbers_match, prompt_bucket
from rewards.envs.registry import register_env
from rewards.envs.tools import ToolEnvironment, ToolError, function_tool

QUANTITIES = range(2, 1000)  # 2-999
PRICES = range(2, 21)
TOOLS = [function_tool("cost", "The price of a quantity of the item, in dollars.", {"quantity": {"type": "integer"}})]
DEMONSTRATED_FRACTION = 0.5


def _candidate(rng: random.Random):
    quantity, price = rng.choice(QUANTITIES), rng.choice(PRICES)  # the price is hidden; the tool reveals totals
    prompt = [{"role": "user", "content": (
        f"What do {quantity} items cost? Ask the cost tool, then end with 'Answer: <number>'.")}]
    return str(quantity), lambda task_id: Task(task_id, prompt, TOOLS, {"quantity": quantity, "price": price})


def generate_tasks(split: str, count: int, seed: int = 0) -> list[Task]:
    return draw_tasks("price_check", split, count, seed, _candidate)


def demonstrated(task: Task) -> bool:
    bucket = prompt_bucket(task)
    return bucket < DEMONSTRATED_FRACTION


def expert(task: Task, messages: list[Message]) -> Message | None:
    """Calls `cost` with the asked quantity, then answers with what it returned; None (not demonstrated) for the
    half of the tasks the warm-up leaves to RL."""
    if not demonstrated(task):
        return None
    results = [m["content"] for m in messages if m["role"] == "tool"]
    if not results:
        arguments = {"quantity": task.data["quantity"]}
        return {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "cost", "arguments": arguments}}]}
    return {"role": "assistant", "content": f"Answer: {results[-1]}"}


def total(data: dict) -> int:
    return data["quantity"] * data["price"]


@register_env("price_check", tasks=generate_tasks, expert=expert)
class PriceCheckEnv(ToolEnvironment):
    async def reset(self, task: Task) -> list[Message]:
        self.data = task.data
        self.answer: float | None = None
        self.asked_right = False
        return [dict(m) for m in task.prompt]

    async def call_tool(self, call: ToolCall) -> str:
        if call.name != "cost":
            raise ToolError(f"unknown tool {call.name!r}")
        quantity = call.arguments["quantity"]
        if quantity < 0:
            raise ToolError("the quantity must not be negative")
        self.asked_right |= quantity == self.data["quantity"]
        return str(quantity * self.data["price"])

    async def finish_turn(self, turn: AssistantTurn) -> StepResult:
        self.answer = final_number(turn.content)
        return StepResult([], done=True)

    async def outcome(self) -> RewardResult:
        expected = total(self.data)
        correct = float(numbers_match(expected, self.answer))
        return RewardResult(correct, {"correct": correct, "answered": float(self.answer is not None),
                                      "asked_right": float(self.asked_right)},
                            {"expected": expected, "answer": self.answer})
