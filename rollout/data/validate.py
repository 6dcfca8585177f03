"""The validation pass that runs before Ray starts: every row is parsed (missing/ill-typed fields, non-UTF-8 text,
empty prompts), and every row -- or a deterministic sample for huge sets -- is rendered with the chat template and
measured in tokens against `max_prompt_tokens`.

Why structure on all rows but tokens on a sample: parsing is needed to serve a row at all and costs microseconds;
rendering + tokenising is what makes a pass over millions of rows slow. `validate_rows: N` only bounds the latter.

`strict` stops with the whole list; `skip` drops the bad rows, counts them and logs the first few."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Iterable

from rollout.data.formats import RawRecord
from rollout.data.render import check_template_supports_tools, render_prompt
from rollout.data.rows import DataError, FieldMap, Issue, PromptRow, parse_record

log = logging.getLogger("slipstream.data")

MAX_STORED_ISSUES = 1000   # a fully broken 10M-row file must not hold 10M messages in memory; all are counted
STRICT_LISTED = 100        # the strict-mode error lists this many, then counts the rest
LOGGED_ISSUES = 5          # skip mode logs this many, then only the count


@dataclass
class ValidationReport:
    source: str
    mode: str = "strict"
    total: int = 0             # records read (including undecodable lines)
    kept: int = 0
    skipped: int = 0           # rows with at least one issue (dropped in skip mode)
    token_checked: int = 0     # rows rendered and measured (all, or the sample)
    issue_count: int = 0
    issues: list[Issue] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)   # tokens, per measured kept row

    def add(self, issue: Issue) -> None:
        self.issue_count += 1
        if len(self.issues) < MAX_STORED_ISSUES:
            self.issues.append(issue)

    @property
    def ok(self) -> bool:
        return self.issue_count == 0

    def summary(self, limit: int = 20) -> str:
        head = (f"{self.source}: {self.total} rows, {self.kept} kept, {self.skipped} with problems "
                f"({self.issue_count} issues); {self.token_checked} rendered and measured")
        lines = [head] + [f"  {issue}" for issue in self.issues[:limit]]
        if self.issue_count > limit:
            lines.append(f"  ... and {self.issue_count - limit} more")
        return "\n".join(lines)


def sample_indices(n: int, validate_rows: int | str, seed: int) -> list[int]:
    """All indices, or a fixed-seed sample in file order (same rows every run, so reports are comparable)."""
    if validate_rows == "all" or int(validate_rows) >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), int(validate_rows)))


def validate_records(records: Iterable[RawRecord], fields: FieldMap, *, source: str, mode: str = "strict",
                     tokenizer=None, max_prompt_tokens: int | None = None, validate_rows: int | str = "all",
                     seed: int = 0) -> tuple[list[PromptRow], ValidationReport]:
    """(rows without issues, report). Raises nothing for bad rows: the caller decides via `enforce`."""
    report = ValidationReport(source, mode)
    parsed: list[PromptRow] = []
    wheres: list[str] = []   # reader locations of the parsed rows, for token-length messages
    for rec in records:
        report.total += 1
        if rec.problem is not None:
            report.add(Issue(rec.where, "(line)", rec.problem, rec.ordinal))
            report.skipped += 1
            continue
        row, issues = parse_record(rec.record, fields, rec.ordinal, rec.where)
        for issue in issues:
            report.add(issue)
        if row is None:
            report.skipped += 1
        else:
            parsed.append(row)
            wheres.append(rec.where)
    if tokenizer is not None and parsed:
        check_template_supports_tools(tokenizer, parsed)
        bad: set[int] = set()
        for i in sample_indices(len(parsed), validate_rows, seed):
            row = parsed[i]
            loc = wheres[i]
            try:
                n = len(render_prompt(tokenizer, row))
            except Exception as exc:  # a Jinja error is a property of the row's content: report, don't crash
                report.add(Issue(loc, fields.messages, f"chat template failed ({type(exc).__name__}: {exc})",
                                 row.index))
                bad.add(i)
                continue
            report.token_checked += 1
            if max_prompt_tokens is not None and n > max_prompt_tokens:
                report.add(Issue(loc, fields.messages, f"prompt is {n} tokens, longer than "
                                 f"data.max_prompt_tokens={max_prompt_tokens}", row.index))
                bad.add(i)
            else:
                report.prompt_lengths.append(n)
        if bad:
            report.skipped += len(bad)
            parsed = [r for i, r in enumerate(parsed) if i not in bad]
    report.kept = len(parsed)
    return parsed, report


def enforce(report: ValidationReport) -> None:
    """strict: stop with the list; skip: log the first few and the count."""
    if report.ok:
        return
    if report.mode == "strict":
        raise DataError(f"{report.issue_count} problem(s) in the data (data.on_invalid=strict; set it to skip to "
                        f"drop bad rows instead):\n{report.summary(limit=STRICT_LISTED)}")
    for issue in report.issues[:LOGGED_ISSUES]:
        log.warning("skipping bad row: %s", issue)
    log.warning("%s: skipped %d of %d rows (%d issues)", report.source, report.skipped, report.total,
                report.issue_count)
