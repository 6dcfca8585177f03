"""A scripted model for the `calculator` environment, working from the token context alone as a real policy
would: the first turn looks up every item of the basket, the second asks `calculate` for the discounted total
from the prices the tool returned, the third answers with the number `calculate` returned. Each turn's tokens are
the chat template's rendering of that assistant message plus the stop token, so a run of it is what a model that
follows the template perfectly generates. A request resumed mid-turn (after an abort) gets the rest of its turn."""
from __future__ import annotations

import functools
import re

from glm5_model.tokenizer.build import TINY_DIR


@functools.cache
def _tools():
    from transformers import AutoTokenizer

    from rewards.envs.builtin.calculator import TOOLS
    from rollout.agent import ChatRenderer

    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    return tok, ChatRenderer(tok, TOOLS)


def assistant_ids(message: dict) -> list[int]:
    """The tokens the template renders for one assistant message after a generation prompt, plus its stop token."""
    return _tools()[1].assistant_ids(message)


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def next_turn(context: str) -> list[int]:
    """The whole next model turn for a decoded context ending in the generation prompt."""
    conversation = context.split("<|user|>")[-1]  # the task's question and the episode so far
    basket = re.findall(r"(\d+) x (\w+)", conversation.split("<|assistant|>")[0])
    discount = re.search(r"takes (\d+)% off", conversation)
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", conversation, flags=re.S)
    if not results:
        return assistant_ids({"role": "assistant", "content": "",
                              "tool_calls": [call("lookup_price", item=item) for _, item in basket]})
    if len(results) == len(basket):
        subtotal = " + ".join(f"{qty} * {price}" for (qty, _), price in zip(basket, results))
        off = int(discount.group(1)) if discount else 0
        return assistant_ids({"role": "assistant", "content": "",
                              "tool_calls": [call("calculate", expression=f"({subtotal}) * {100 - off} / 100")]})
    return assistant_ids({"role": "assistant", "content": f"The total is computed. Answer: {results[-1]}"})


def respond(input_ids: list[int]) -> list[int]:
    """What is left of the current turn, given the prompt and everything generated so far."""
    tok, _ = _tools()
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    start = len(input_ids) - 1 - input_ids[::-1].index(assistant)
    newline = tok.encode("\n", add_special_tokens=False)
    head = start + 1 + (len(newline) if input_ids[start + 1:start + 1 + len(newline)] == newline else 0)
    context, partial = input_ids[:head], input_ids[head:]
    turn = next_turn(tok.decode(context, skip_special_tokens=False))
    if turn[:len(partial)] != partial:
        raise AssertionError("a resumed request does not continue its own turn")
    return turn[len(partial):]
