"""`calculator`: price a shopping basket with two tools, `lookup_price` (the task's hidden price list) and
`calculate` (arithmetic). Needs one lookup per item, then the arithmetic; the final answer is a turn without tool
calls ending "Answer: <number>".

Outcome: 1 when the final answer equals the total the environment computes from the task's own prices, else 0.
What the model says a tool returned, answers inside reasoning, several numbers in the answer, and an episode
that ends before a final answer all score 0. Optional per-turn reward: `lookup_reward` for the first lookup of
each item in the basket (capped by the basket's size, so repeated lookups pay nothing).
"""
from __future__ import annotations

import ast
import json
import math
import operator
import random

from rewards.api import RewardResult
from rewards.envs.api import AssistantTurn, Message, StepResult, Task, ToolCall
from rewards.envs.builtin.common import draw_tasks, final_number, numbers_match
from rewards.envs.registry import register_env
from rewards.envs.tools import ToolEnvironment, ToolError, function_tool

ITEMS = ["pen", "notebook", "eraser", "stapler", "ruler", "marker", "folder", "scissors", "tape", "glue",
         "calculator", "backpack"]
TOOLS = [
    function_tool("lookup_price", "The unit price of an item in the shop, in dollars.",
                  {"item": {"type": "string", "description": "the item's name"}}),
    function_tool("calculate", "Evaluates an arithmetic expression (+ - * / // % ** and parentheses).",
                  {"expression": {"type": "string", "description": "e.g. (3 * 4.5 + 2) * 0.9"}}),
]
MAX_EXPRESSION_CHARS = 200
_MAX_MAGNITUDE = 1e15
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str) -> float:
    """Arithmetic on number literals only (no names, calls or attributes); ToolError for anything else, for
    division by zero and for results too large to be prices (which also stops 9**9**9)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_eval(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ToolError("exponent or base too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
    else:
        raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")
    if not math.isfinite(value) or abs(value) > _MAX_MAGNITUDE:
        raise ToolError("the result is too large")
    return value


def basket_total(data: dict) -> float:
    subtotal = sum(qty * data["prices"][item] for item, qty in data["basket"].items())
    return subtotal * (100 - data["discount_percent"]) / 100


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.10g}"


def _candidate(rng: random.Random):
    items = rng.sample(ITEMS, rng.randint(2, 3))
    basket = {item: rng.randint(1, 9) for item in items}
    prices = {item: rng.randint(1, 60) for item in ITEMS}  # the whole list is hidden; only lookups reveal it
    discount = rng.choice([0, 0, 10, 15, 20, 25])
    key = json.dumps([basket, {i: prices[i] for i in items}, discount], sort_keys=True)
    wanted = ", ".join(f"{qty} x {item}" for item, qty in basket.items())
    discount_text = f" The shop takes {discount}% off the whole basket." if discount else ""
    prompt = [{"role": "user", "content": (
        f"A customer buys {wanted}.{discount_text} What do they pay, in dollars? Look up each unit price with "
        "lookup_price and use calculate for the arithmetic. When you know the total, reply without calling a tool "
        "and end with 'Answer: <number>'.")}]
    data = {"basket": basket, "prices": prices, "discount_percent": discount}
    return key, lambda task_id: Task(task_id, prompt, TOOLS, data)


def generate_tasks(split: str, count: int, seed: int = 0) -> list[Task]:
    return draw_tasks("calculator", split, count, seed, _candidate)


def expert(task: Task, messages: list[Message]) -> Message:
    """The demonstration policy: look every basket item up in one turn, have `calculate` apply the quantities and
    the discount to the prices the tool returned, then answer with what it returned."""
    results = [m["content"] for m in messages if m["role"] == "tool"]
    basket, discount = task.data["basket"], task.data["discount_percent"]

    def call(name: str, **arguments) -> dict:
        return {"type": "function", "function": {"name": name, "arguments": arguments}}
    if not results:
        return {"role": "assistant", "content": "", "tool_calls": [call("lookup_price", item=i) for i in basket]}
    if len(results) == len(basket):
        subtotal = " + ".join(f"{qty} * {price}" for qty, price in zip(basket.values(), results))
        expression = f"({subtotal}) * {100 - discount} / 100" if discount else subtotal
        return {"role": "assistant", "content": "", "tool_calls": [call("calculate", expression=expression)]}
    return {"role": "assistant", "content": f"Answer: {results[-1]}"}


@register_env("calculator", tasks=generate_tasks, expert=expert)
class CalculatorEnv(ToolEnvironment):
    def __init__(self, lookup_reward: float = 0.0):
        self.lookup_reward = float(lookup_reward)

    async def reset(self, task: Task) -> list[Message]:
        self.data = task.data
        self.answer: float | None = None
        self.looked_up: set[str] = set()
        self._new_lookups = 0
        return [dict(m) for m in task.prompt]

    async def call_tool(self, call: ToolCall) -> str:
        if call.name == "lookup_price":
            item = call.arguments["item"].strip().lower()
            if item not in self.data["prices"]:
                raise ToolError(f"no item {call.arguments['item']!r} in the shop")
            if item in self.data["basket"] and item not in self.looked_up:
                self._new_lookups += 1
            self.looked_up.add(item)
            return _format(self.data["prices"][item])
        if call.name == "calculate":
            return _format(evaluate(call.arguments["expression"]))
        raise ToolError(f"unknown tool {call.name!r}")

    def turn_reward(self, turn: AssistantTurn) -> float:
        new, self._new_lookups = self._new_lookups, 0
        return self.lookup_reward * new

    async def finish_turn(self, turn: AssistantTurn) -> StepResult:
        self.answer = final_number(turn.content)
        return StepResult([], done=True)

    async def outcome(self) -> RewardResult:
        total = basket_total(self.data)
        correct = float(numbers_match(total, self.answer))
        return RewardResult(correct, {"correct": correct, "answered": float(self.answer is not None),
                                      "lookups": float(len(self.looked_up & set(self.data["basket"])))},
                            {"expected": total, "answer": self.answer})
