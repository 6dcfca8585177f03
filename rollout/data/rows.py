"""One dataset record -> one PromptRow, or the list of problems that stop it (each naming the field).

Records come from any format (rollout/data/formats.py) as plain Python values. Checks here are the cheap,
structural ones and run on every row; rendering and token counts live in validate.py."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PromptRow:
    index: int                 # record number in the source (0-based, counting dropped rows), for logs
    messages: list[dict[str, Any]]
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None   # passed to the chat template as `tools`
    task: str | None = None                     # task family, e.g. for per-family reward routing or metrics


class DataError(ValueError):
    """A bad dataset (row, file or cursor); the message names the file, row and field."""


@dataclass(frozen=True)
class Issue:
    where: str     # "path line 7" (JSONL, 1-based) or "path row 6" (tabular, 0-based)
    field: str     # dotted field path inside the record, e.g. "messages[1].content"; "(line)" for the whole row
    message: str
    ordinal: int   # record number, to drop the row in skip mode

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}"


@dataclass(frozen=True)
class FieldMap:
    """Which record fields hold what. Optional fields (label, task, tools) may be absent from a row."""
    messages: str = "messages"
    label: str | None = "label"
    task: str | None = "task"
    tools: str | None = "tools"
    require_label: bool = False
    system_prompt: str | None = None   # prepended as a system message when a row has none


class _Bad(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _text(value: Any, path: str) -> Any:
    """Decodes bytes (binary Parquet/Arrow columns) and rejects strings that cannot be written as UTF-8 (lone
    surrogates from JSON escapes like "\\ud800"): the tokenizer would fail on them much later, mid-run."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad(path, f"not valid UTF-8 (byte {exc.start})") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Bad(path, f"not valid UTF-8 (character {exc.start})") from None
    return value


def _deep_text(value: Any, path: str) -> Any:
    """`_text` over nested lists/dicts (tools, arguments, labels)."""
    if isinstance(value, dict):
        return {k: _deep_text(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_text(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return _text(value, path)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _tool_calls(calls: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(calls, (list, tuple)):
        raise _Bad(path, f"expected a list of tool calls, got {_type(calls)}")
    out = []
    for i, call in enumerate(calls):
        where = f"{path}[{i}]"
        if not isinstance(call, dict):
            raise _Bad(where, f"expected a tool call object, got {_type(call)}")
        fn = call.get("function") if call.get("function") is not None else call
        fn_path = f"{where}.function" if call.get("function") is not None else where
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _Bad(f"{fn_path}.name", "missing or not a non-empty string")
        args = fn.get("arguments")
        if args is None:
            args = {}
        if isinstance(args, str):  # OpenAI style: arguments as a JSON string; the template needs a mapping
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise _Bad(f"{fn_path}.arguments", f"not valid JSON ({exc.msg})") from None
        if not isinstance(args, dict):
            raise _Bad(f"{fn_path}.arguments", f"expected an object, got {_type(args)}")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _messages(value: Any, key: str) -> list[dict[str, Any]]:
    value = _text(value, key)
    if value is None:
        raise _Bad(key, "missing (null)")
    if isinstance(value, str):  # plain-string prompt = one user turn
        if not value.strip():
            raise _Bad(key, "empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)):
        raise _Bad(key, f"expected a list of chat messages or a string, got {_type(value)}")
    if not value:
        raise _Bad(key, "empty prompt (no messages)")
    out = []
    for i, m in enumerate(value):
        path = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _Bad(path, f"expected a message object, got {_type(m)}")
        role = _text(m.get("role"), f"{path}.role")
        if role not in ROLES:
            raise _Bad(f"{path}.role", f"expected one of {list(ROLES)}, got {role!r:.40}")
        content = _text(m.get("content"), f"{path}.content")
        calls = m.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
            raise _Bad(f"{path}.content", "missing")
        if content is not None and not isinstance(content, str):
            raise _Bad(f"{path}.content", f"expected a string, got {_type(content)}")
        msg = {"role": role, "content": content or ""}
        if calls:
            if role != "assistant":
                raise _Bad(f"{path}.tool_calls", f"only assistant messages may call tools, this one is {role!r}")
            msg["tool_calls"] = _deep_text(_tool_calls(calls, f"{path}.tool_calls"), f"{path}.tool_calls")
        # Other keys (name, tool_call_id, ...) pass through; nulls are dropped because Parquet/Arrow structs
        # fill every key of the column's schema, and the template must not see them as set.
        for k, v in m.items():
            if k not in msg and k != "tool_calls" and v is not None:
                msg[k] = _deep_text(v, f"{path}.{k}")
        out.append(msg)
    if not any(m["content"].strip() or m.get("tool_calls") for m in out if m["role"] != "system"):
        raise _Bad(key, "empty prompt (no user/assistant/tool message has content)")
    return out


def _tools(value: Any, key: str) -> list[dict[str, Any]] | None:
    value = _text(value, key)
    if isinstance(value, str):  # a JSON string column is the practical way to store tool schemas in Parquet
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Bad(key, f"not valid JSON ({exc.msg})") from None
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise _Bad(key, f"expected a list of tool schemas, got {_type(value)}")
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _Bad(f"{key}[{i}]", "expected a tool schema with a string 'name' (or 'function.name')")
    return _deep_text(list(value), key) or None


def parse_record(record: Any, fields: FieldMap, ordinal: int, where: str) -> tuple[PromptRow | None, list[Issue]]:
    """All problems of one record (one per field), so a strict-mode report shows everything to fix at once."""
    if not isinstance(record, dict):
        return None, [Issue(where, "(line)", f"expected an object, got {_type(record)}", ordinal)]
    issues: list[Issue] = []

    def check(key: str | None, fn, required: bool = False) -> Any:
        if key is None:
            return None
        if key not in record:
            if required:
                issues.append(Issue(where, key, "missing", ordinal))
            return None
        try:
            return fn(record[key], key)
        except _Bad as bad:
            issues.append(Issue(where, bad.field, bad.message, ordinal))
            return None

    messages = check(fields.messages, _messages, required=True)
    tools = check(fields.tools, _tools)
    label = check(fields.label, _deep_text, required=fields.require_label)
    if fields.require_label and fields.label in record and record[fields.label] is None:
        issues.append(Issue(where, fields.label, "missing (null)", ordinal))

    def task_check(value: Any, key: str) -> str | None:
        value = _text(value, key)
        if value is not None and not isinstance(value, str):
            raise _Bad(key, f"expected a string, got {_type(value)}")
        return value

    task = check(fields.task, task_check)
    if issues:
        return None, issues
    if fields.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": fields.system_prompt}, *messages]
    mapped = {fields.messages, fields.label, fields.task, fields.tools}
    metadata = {k: v for k, v in record.items() if k not in mapped}
    return PromptRow(ordinal, messages, label, metadata, tools, task), []
