"""Prompt data: formats (JSONL, JSON, Parquet, datasets directories, hub), field mapping, validation before Ray
starts, chat-template rendering with tools, and the resumable PromptSource cursor.

    python -m rollout.data inspect [OVERRIDES...]     # counts, token-length histogram, first prompt, report
"""
from rollout.data.formats import detect_format, read_records
from rollout.data.loader import LoadedData, field_map, holdout, load_data, load_prompt_rows, make_source
from rollout.data.render import render_prompt
from rollout.data.rows import DataError, FieldMap, Issue, PromptRow, parse_record
from rollout.data.source import DataExhausted, PromptSource, dataset_fingerprint
from rollout.data.validate import ValidationReport, enforce, validate_records

__all__ = [
    "DataError", "DataExhausted", "FieldMap", "Issue", "LoadedData", "PromptRow", "PromptSource",
    "ValidationReport", "dataset_fingerprint", "detect_format", "enforce", "field_map", "holdout", "load_data",
    "load_prompt_rows", "make_source", "parse_record", "read_records", "render_prompt", "validate_records",
]
