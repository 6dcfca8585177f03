"""Tool schemas and a base class for environments whose turns are tool calls.

`validate_arguments` checks a call's arguments against the tool's JSON schema (with `jsonschema`, so every
keyword a schema author uses means what the standard says). `ToolEnvironment` dispatches each well-formed call to
`call_tool` and hands turns without calls to `finish_turn` (a final answer, a "done").
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

import jsonschema

from rewards.envs.api import AssistantTurn, Environment, StepResult, ToolCall, tool_message, tool_parameters


def function_tool(name: str, description: str, properties: dict[str, Any],
                  required: list[str] | None = None) -> dict[str, Any]:
    """An OpenAI function tool schema that accepts exactly `properties` (no others)."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties,
                       "required": list(properties) if required is None else required,
                       "additionalProperties": False}}}


def validate_arguments(schema: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """None when `arguments` satisfy the tool's parameter schema, else one sentence saying what is wrong."""
    params = tool_parameters(schema)
    validator_cls = jsonschema.validators.validator_for(params, default=jsonschema.Draft202012Validator)
    try:
        validator_cls.check_schema(params)
    except jsonschema.SchemaError as exc:
        # The task's schema is broken, not the model's call: say so, so the task gets fixed.
        raise ValueError(f"tool schema {schema!r} is not a valid JSON schema: {exc.message}") from None
    error = jsonschema.exceptions.best_match(validator_cls(params).iter_errors(arguments))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"argument {where!r}: {error.message}" if where else error.message


class ToolError(Exception):
    """Raised by a tool for a call that fails (a missing file, a division by zero): the model is told the
    message and the call counts as failed; the episode goes on."""


class ToolEnvironment(Environment):
    """An environment whose tools are answered one call at a time.

    Subclasses implement `call_tool` (return the tool's text result; raise ToolError for a failed call) and
    `finish_turn` (a turn without tool calls: usually the final answer, so it returns done=True). A tool that ends
    the episode (a `submit`) sets `self.done`. Anything else a tool raises is the environment's failure, handled by
    the runner (episode ended or error reply, counted).
    """

    done: bool = False

    @abstractmethod
    async def call_tool(self, call: ToolCall) -> str:
        """The text result of one well-formed call."""

    @abstractmethod
    async def finish_turn(self, turn: AssistantTurn) -> StepResult:
        """Answer a turn with no tool calls."""

    def turn_reward(self, turn: AssistantTurn) -> float:
        """Optional reward of a tool-calling turn, computed after its calls ran (default 0)."""
        return 0.0

    async def step(self, turn: AssistantTurn) -> StepResult:
        if not turn.tool_calls:
            return await self.finish_turn(turn)
        observations, failed = [], 0
        for call in turn.tool_calls:
            try:
                result = await self.call_tool(call)
            except ToolError as exc:
                failed += 1
                result = f"Error: {exc}"
            observations.append(tool_message(call.id, result))
        return StepResult(observations, reward=self.turn_reward(turn), failed_calls=failed,
                          done=self.done)
