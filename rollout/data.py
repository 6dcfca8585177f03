"""Prompt source: JSONL rows of chat messages (+ label), validated up front, served in shuffled epochs with a
cursor that can be saved and restored (the full dataset issue adds Parquet, field mapping and inspection)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptRow:
    index: int                 # row number in the file (0-based), for error messages and logs
    messages: list[dict[str, str]]
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


class DataError(ValueError):
    """A bad dataset row; the message names the file, row and field."""


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of chat messages or a string, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{i}]: each message needs string 'role' and 'content', got {m!r:.80}")
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{where}: all message contents are empty")
    return messages


def load_prompt_rows(path: str | Path, messages_key: str = "messages", label_key: str = "label") -> list[PromptRow]:
    path = Path(path)
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or messages_key not in record:
                raise DataError(f"{where}: missing field {messages_key!r}")
            messages = _check_messages(record[messages_key], f"{where}: field {messages_key!r}")
            meta = {k: v for k, v in record.items() if k not in (messages_key, label_key)}
            rows.append(PromptRow(len(rows), messages, record.get(label_key), meta))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


class PromptSource:
    """Endless shuffled epochs over rows; `state()` / `load_state()` make resumption exact."""

    def __init__(self, rows: list[PromptRow], seed: int = 0):
        self.rows, self.seed = rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[PromptRow]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self.rows[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
