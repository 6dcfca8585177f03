"""From the `data` config to validated train/eval prompt rows and a PromptSource.

Eval split, in order of precedence:
  * `eval_path` (and/or `eval_split`): a separate source read and validated like the train one -- a second file,
    or another split of the same `save_to_disk` directory / hub dataset (`eval_split` alone reuses `path`);
  * `eval_fraction` > 0: that fraction of the (valid) train rows is held out. Membership is decided by ranking
    a hash of (shuffle_seed, record number), so the count is exact and a row's side does not depend on file
    order or on which other rows were dropped.
Config validation (trainer/config.py) rejects setting both."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout.data.formats import detect_format, read_records
from rollout.data.rows import DataError, FieldMap, PromptRow
from rollout.data.source import PromptSource
from rollout.data.validate import ValidationReport, enforce, validate_records

if TYPE_CHECKING:
    from rollout.data.config import DataConfig


@dataclass
class LoadedData:
    train: list[PromptRow]
    eval: list[PromptRow] = field(default_factory=list)
    reports: list[ValidationReport] = field(default_factory=list)   # train first, then eval if separate
    format: str = ""


def field_map(cfg: "DataConfig") -> FieldMap:
    return FieldMap(cfg.messages_key, cfg.label_key, cfg.task_key, cfg.tools_key, cfg.require_label,
                    cfg.system_prompt)


def resolve_source(path: str, fmt: str) -> str:
    """Hub names stay as they are; relative paths are relative to the repository, as everywhere in the config."""
    if fmt in ("hub", "tasks"):
        return path
    from rollout.config_schema import resolve_path

    return str(resolve_path(path))


def _load_one(cfg: "DataConfig", path: str, split: str, tokenizer, label: str) -> tuple[list[PromptRow],
                                                                                          ValidationReport, str]:
    source = resolve_source(path, cfg.format)
    fmt = detect_format(source, cfg.format)
    # Generated rows are ours, in the default field names, and always labelled.
    fields = field_map(cfg) if fmt != "tasks" else FieldMap(require_label=True, system_prompt=cfg.system_prompt)
    count = cfg.generated_eval_tasks if label == "eval" else cfg.generated_tasks
    counts = None if label == "eval" else cfg.generated_tasks_by_name
    rows, report = validate_records(
        read_records(source, fmt, split, generated_tasks=count, seed=cfg.shuffle_seed, generated_counts=counts),
        fields,
        source=f"{label} {source}", mode=cfg.on_invalid,
        tokenizer=tokenizer, max_prompt_tokens=cfg.max_prompt_tokens, validate_rows=cfg.validate_rows,
        seed=cfg.shuffle_seed)
    return rows, report, fmt


def holdout(rows: list[PromptRow], fraction: float, seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, eval), both in file order."""
    if len(rows) < 2:
        raise DataError(f"data.eval_fraction: need at least 2 valid rows to hold some out, have {len(rows)}")
    k = min(max(1, round(len(rows) * fraction)), len(rows) - 1)

    def rank(r: PromptRow) -> bytes:
        return hashlib.sha256(f"eval-split:{seed}:{r.index}".encode()).digest()

    held = {r.index for r in sorted(rows, key=rank)[:k]}
    return [r for r in rows if r.index not in held], [r for r in rows if r.index in held]


def load_data(cfg: "DataConfig", tokenizer=None, *, enforce_mode: bool = True) -> LoadedData:
    """Reads and validates train (and eval) rows. With a tokenizer, prompts are rendered and measured too.
    enforce_mode=False returns the reports without raising (what `inspect` needs)."""
    train, report, fmt = _load_one(cfg, cfg.path, cfg.split, tokenizer, "train")
    data = LoadedData(train, [], [report], fmt)
    if cfg.eval_path or cfg.eval_split:
        data.eval, eval_report, _ = _load_one(cfg, cfg.eval_path or cfg.path, cfg.eval_split or cfg.split,
                                              tokenizer, "eval")
        data.reports.append(eval_report)
    elif cfg.eval_fraction > 0 and train:
        data.train, data.eval = holdout(train, cfg.eval_fraction, cfg.shuffle_seed)
    if enforce_mode:
        for r in data.reports:
            enforce(r)
        if not data.train:
            raise DataError(f"{report.source}: no usable rows ({report.total} read, {report.skipped} dropped)")
    return data


def make_source(cfg: "DataConfig", rows: list[PromptRow]) -> PromptSource:
    return PromptSource(rows, cfg.shuffle_seed, shuffle=cfg.shuffle, epochs=cfg.epochs)


def load_prompt_rows(path: str | Path, messages_key: str = "messages", label_key: str | None = "label",
                     fmt: str = "auto", **options: Any) -> list[PromptRow]:
    """The pre-config API: every row of one file or directory (any format), strict, no token checks.
    `options` are FieldMap fields (task, tools, require_label, system_prompt)."""
    fields = FieldMap(messages_key, label_key, **options)
    rows, report = validate_records(read_records(path, fmt),
                                    fields, source=str(path))
    enforce(report)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
