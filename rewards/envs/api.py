"""The environment contract: what an agent task hands the rollout, and what the rollout hands back each turn.

An environment is a stateful object for ONE episode (a factory makes a fresh one per episode):

    class MyEnv(Environment):
        async def reset(self, task: Task) -> list[Message] | EpisodeStart: ...   # the first messages the model sees
        async def step(self, turn: AssistantTurn) -> StepResult: ...            # answer one model turn
        async def outcome(self) -> RewardResult: ...                            # the episode's outcome reward
        async def close(self) -> None: ...                                      # optional clean-up

Messages are OpenAI-style chat messages ({"role": "system"|"user"|"tool", "content": str, "tool_call_id": ...}),
the shape gym-like text environments (SkyRL-gym, NeMo Gym) already use. The model's turn arrives parsed
(`AssistantTurn`): its text, its well-formed tool calls and the malformed ones (which the runner answers itself,
so an environment only ever sees calls that name one of its tools with arguments valid for that tool's schema).
"""
from __future__ import annotations

import enum
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from rewards.api import RewardResult

Message = dict[str, Any]
"""An OpenAI-style chat message."""

OBSERVATION_ROLES = ("system", "user", "tool")


@dataclass(frozen=True)
class Task:
    """One episode's task. `prompt` is what the model is shown first (unless `reset` builds its own), `tools` the
    OpenAI tool schemas ({"type": "function", "function": {"name", "description", "parameters"}}) rendered into
    the prompt and used to check the model's calls, `data` what only the environment sees (the hidden answer,
    the tests, the file system)."""

    id: str
    prompt: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    split: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Task.id must be a non-empty string, got {self.id!r}")
        for i, tool in enumerate(self.tools):
            if tool_name(tool) is None:
                raise ValueError(f"task {self.id}: tools[{i}] is not an OpenAI function schema "
                                 "({'type': 'function', 'function': {'name': ..., 'parameters': {...}}})")


def tool_name(schema: dict[str, Any]) -> str | None:
    """The name of an OpenAI function tool schema (also accepts the bare {"name", "parameters"} form)."""
    if not isinstance(schema, dict):
        return None
    fn = schema.get("function", schema) if schema.get("type", "function") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) and name else None


def tool_parameters(schema: dict[str, Any]) -> dict[str, Any]:
    fn = schema.get("function", schema)
    params = fn.get("parameters")
    return params if isinstance(params, dict) else {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call: `name` is one of the task's tools and `arguments` validate against its schema.
    `index` is the call's position among all calls of its turn (malformed ones included)."""

    id: str
    name: str
    arguments: dict[str, Any]
    index: int = 0

    def to_message(self) -> dict[str, Any]:
        """As in a chat template's assistant message (HF convention: `arguments` as a mapping)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def to_openai(self) -> dict[str, Any]:
        """As on the OpenAI wire (`arguments` as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


class MalformedKind(str, enum.Enum):
    BAD_FORMAT = "bad_format"                # not the tool-call syntax: unclosed tag, no name, stray text
    BAD_JSON = "bad_json"                    # a non-string argument whose value is not JSON
    UNKNOWN_TOOL = "unknown_tool"            # a name the task does not offer
    INVALID_ARGUMENTS = "invalid_arguments"  # missing, unexpected, duplicated or wrongly typed arguments


@dataclass(frozen=True)
class MalformedCall:
    id: str
    kind: MalformedKind
    error: str       # what the model is told
    raw: str         # the call's text as generated
    name: str | None = None
    index: int = 0


@dataclass(frozen=True)
class AssistantTurn:
    """One model turn, parsed. `content` is the text outside tool calls (reasoning excluded), `text` the whole
    turn as generated."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    malformed: tuple[MalformedCall, ...] = ()
    reasoning: str | None = None
    text: str = ""

    @property
    def call_count(self) -> int:
        return len(self.tool_calls) + len(self.malformed)

    def to_message(self) -> Message:
        """The assistant message as a chat template renders it (well-formed calls only)."""
        message: Message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.to_message() for c in self.tool_calls]
        return message

    def to_openai(self) -> Message:
        message: Message = {"role": "assistant", "content": self.content or None}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message


def tool_message(call_id: str, content: str) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


@dataclass(frozen=True)
class EpisodeStart:
    """What `reset` may return instead of a bare message list: the first messages and the tools, for environments
    that only learn their tools when the episode starts (the verifiers adapter). `tools=None`: the task's."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None = None


@dataclass
class StepResult:
    """The environment's answer to one turn. `reward` is this turn's reward (0 when the environment gives only an
    outcome), `failed_calls` how many of the turn's calls it answered with an error (a tool that raised, a file
    that does not exist): they count against the tool-call success rate."""

    observations: list[Message] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    failed_calls: int = 0


def check_step_result(result: Any) -> StepResult:
    """The result, or a TypeError/ValueError naming what is wrong with it (the runner counts it as an env error)."""
    if not isinstance(result, StepResult):
        raise TypeError(f"step returned {type(result).__name__}, not StepResult")
    check_observations(result.observations)
    if isinstance(result.reward, bool) or not isinstance(result.reward, (int, float)) or not math.isfinite(
            result.reward):
        raise ValueError(f"StepResult.reward must be a finite number, got {result.reward!r}")
    if not isinstance(result.failed_calls, int) or result.failed_calls < 0:
        raise ValueError(f"StepResult.failed_calls must be an int >= 0, got {result.failed_calls!r}")
    return result


def check_observations(messages: Any) -> list[Message]:
    if not isinstance(messages, list):
        raise TypeError(f"observations must be a list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in OBSERVATION_ROLES:
            raise ValueError(f"observation {i} must be a message with role in {OBSERVATION_ROLES}, got {message!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"observation {i} ({message['role']}): content must be a string")
    return messages


class Environment(ABC):
    """Base class of environments (any object with these coroutines works; the base adds the optional ones)."""

    @abstractmethod
    async def reset(self, task: Task) -> list[Message] | EpisodeStart:
        """Start the episode; returns the messages the model is prompted with."""

    @abstractmethod
    async def step(self, turn: AssistantTurn) -> StepResult:
        """Answer one model turn."""

    @abstractmethod
    async def outcome(self) -> RewardResult:
        """The episode's outcome reward, asked once when it ends, however it ended (the model finished, max
        turns, the token budget): score what the environment itself knows, never the model's claims."""

    async def close(self) -> None:
        """Release what the episode holds (processes, sandboxes)."""
