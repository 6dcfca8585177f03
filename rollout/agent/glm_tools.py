"""Tool calls in the GLM chat template's format, parsed from a model turn.

GLM-4.5 / GLM-5 (and the tiny tokenizer's template, glm5_model/tokenizer/build.py) write a call as

    <tool_call>name<arg_key>key</arg_key><arg_value>value</arg_value>...</tool_call>

with string values raw and every other value as JSON, so a value is decoded by the type the tool's schema gives
its parameter. Whitespace between the elements (GLM-4.5 puts newlines there) is accepted. Reasoning is a
<think>...</think> block. Everything that is not a well-formed call of one of the task's tools with valid arguments
becomes a `MalformedCall` with the message the model is answered with; parsing never raises on model output.
"""
from __future__ import annotations

import json
import re
from typing import Any

from rewards.envs.api import AssistantTurn, MalformedCall, MalformedKind, ToolCall, tool_name, tool_parameters
from rewards.envs.tools import validate_arguments

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FORMAT_HINT = ("Call a tool as <tool_call>name<arg_key>argument</arg_key><arg_value>value</arg_value>"
               "</tool_call> (string values as they are, other values as JSON).")
_THINK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)(" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)
_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9_.:\-]+")
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
               "object": dict, "null": type(None)}


def parse_glm_turn(text: str, tools: list[dict[str, Any]], id_prefix: str = "call_") -> AssistantTurn:
    """The assistant turn in `text` (decoded with special tokens, the stop token removed), its calls checked
    against `tools` (OpenAI function schemas). Call ids are `id_prefix` + the call's index in the turn."""
    schemas = {tool_name(t): t for t in tools if tool_name(t)}
    reasoning_parts = [m.group(1) for m in _THINK.finditer(text)]
    body = _THINK.sub("", text)
    calls: list[ToolCall] = []
    malformed: list[MalformedCall] = []
    content_parts, position = [], 0
    for index, match in enumerate(_CALL.finditer(body)):
        content_parts.append(body[position:match.start()])
        position = match.end()
        call_id = f"{id_prefix}{index}"
        parsed = _parse_call(match.group(1), closed=bool(match.group(2)), schemas=schemas, call_id=call_id,
                             index=index, raw=match.group(0))
        (calls if isinstance(parsed, ToolCall) else malformed).append(parsed)
    content_parts.append(body[position:])
    # The text before the first call is kept exactly (it is what the template renders back); text between or
    # after calls is rare and joined on, trimmed.
    content = content_parts[0] + "".join(p.strip() for p in content_parts[1:])
    reasoning = "".join(reasoning_parts) if reasoning_parts else None
    return AssistantTurn(content=content, tool_calls=tuple(calls), malformed=tuple(malformed), reasoning=reasoning,
                         text=text)


def _parse_call(inner: str, *, closed: bool, schemas: dict[str, dict], call_id: str, index: int,
                raw: str) -> ToolCall | MalformedCall:
    def bad(kind: MalformedKind, why: str, name: str | None = None) -> MalformedCall:
        hint = f" {FORMAT_HINT}" if kind in (MalformedKind.BAD_FORMAT, MalformedKind.BAD_JSON) else ""
        return MalformedCall(call_id, kind, why + hint, raw, name, index)

    if not closed:
        return bad(MalformedKind.BAD_FORMAT, "the tool call is not closed with </tool_call>.")
    head, _, _ = inner.partition("<arg_key>")
    name = head.strip()
    if not _NAME.fullmatch(name):
        what = "no tool name" if not name else f"{name[:60]!r} is not a tool name"
        return bad(MalformedKind.BAD_FORMAT, f"the tool call has {what}.")
    rest = inner[len(head):]
    pairs, position = [], 0
    for match in _ARG.finditer(rest):
        if match.start() != position:
            break
        pairs.append((match.group(1).strip(), match.group(2)))
        position = match.end()
    if rest[position:].strip():
        return bad(MalformedKind.BAD_FORMAT, f"the arguments of {name!r} are not <arg_key>/<arg_value> pairs.",
                   name)
    schema = schemas.get(name)
    if schema is None:
        offered = ", ".join(sorted(schemas)) or "none"
        return bad(MalformedKind.UNKNOWN_TOOL, f"there is no tool {name!r}; the tools are: {offered}.", name)
    properties = tool_parameters(schema).get("properties") or {}
    arguments: dict[str, Any] = {}
    for key, value in pairs:
        if key in arguments:
            return bad(MalformedKind.INVALID_ARGUMENTS, f"tool {name!r}: argument {key!r} is given twice.", name)
        try:
            arguments[key] = decode_value(value, properties.get(key))
        except ValueError as exc:
            return bad(MalformedKind.BAD_JSON, f"tool {name!r}: argument {key!r} is not valid JSON ({exc}).", name)
    error = validate_arguments(schema, arguments)
    if error is not None:
        return bad(MalformedKind.INVALID_ARGUMENTS, f"tool {name!r}: {error}.", name)
    return ToolCall(call_id, name, arguments, index)


def decode_value(value: str, schema: dict[str, Any] | None) -> Any:
    """An <arg_value> by its parameter's schema type: raw for strings, JSON otherwise (ValueError if it is not).
    A parameter that allows a string and other types is the JSON value when that is of an allowed non-string type,
    else the raw string; one without a type is JSON when it parses, else the raw string."""
    types = (schema or {}).get("type")
    allowed = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else None
    if allowed == {"string"}:
        return value
    try:
        decoded = json.loads(value)
    except ValueError as exc:
        if allowed is None or "string" in allowed:
            return value
        raise ValueError(str(exc)) from None
    if allowed is not None and "string" in allowed:
        others = tuple(t for name in allowed - {"string"} for t in _flatten(_JSON_TYPES.get(name, ())))
        return decoded if others and isinstance(decoded, others) and not isinstance(decoded, str) else value
    return decoded


def _flatten(types: Any) -> tuple:
    return types if isinstance(types, tuple) else (types,)
