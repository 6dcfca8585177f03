"""Every supported source format yields the same rows through the same field mapping, and the eval split
options behave as documented (rollout/data/loader.py). Binary fixtures are written into tmp_path."""
from __future__ import annotations

import json

import pytest

from rollout.data import DataError, detect_format, load_data, load_prompt_rows
from trainer.config import DataConfig

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
# A user's own column names: a plain-string prompt, an answer, a task family and tools stored as a JSON string.
RECORDS = [
    {"uid": i, "question": f"What is {i} plus {i}?", "answer": str(2 * i), "family": "math" if i % 2 else "chat",
     "tool_specs": json.dumps(TOOLS) if i == 1 else ""}
    for i in range(6)
]
MAPPING = dict(messages_key="question", label_key="answer", task_key="family", tools_key="tool_specs")


def _check_rows(rows, n=6):
    assert len(rows) == n
    assert [r.index for r in rows] == list(range(n))
    r1 = rows[1]
    assert r1.messages == [{"role": "user", "content": "What is 1 plus 1?"}]
    assert r1.label == "2" and r1.task == "math" and r1.tools == TOOLS
    assert rows[0].tools is None and rows[0].task == "chat"
    assert r1.metadata == {"uid": 1}   # unmapped columns travel as metadata


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    assert detect_format(path) == "jsonl"
    _check_rows(load_data(DataConfig(path=str(path), **MAPPING)).train)


def test_json_array_and_json_lines_named_json(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(RECORDS))
    assert detect_format(arr) == "json"
    _check_rows(load_data(DataConfig(path=str(arr), **MAPPING)).train)
    lines = write_jsonl(tmp_path / "lines.json", RECORDS)
    assert detect_format(lines) == "jsonl"


def test_parquet_file_and_shard_directory(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", RECORDS)
    _check_rows(load_data(DataConfig(path=str(path), **MAPPING)).train)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "part-000.parquet", RECORDS[:4])
    write_parquet(shards / "part-001.parquet", RECORDS[4:])
    data = load_data(DataConfig(path=str(shards), **MAPPING))
    _check_rows(data.train)
    assert data.format == "parquet"


def test_parquet_chat_messages_with_struct_nulls(tmp_path):
    # Arrow structs give every message every key of the column schema; the nulls must not reach the template.
    records = [{"messages": [{"role": "system", "content": "Be brief.", "name": None},
                             {"role": "user", "content": "Hi", "name": "alice"}], "label": None}]
    rows = load_prompt_rows(write_parquet(tmp_path / "c.parquet", records))
    assert rows[0].messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi", "name": "alice"}]


def test_datasets_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "single"))
    data = load_data(DataConfig(path=str(tmp_path / "single"), **MAPPING))
    assert data.format == "arrow"
    _check_rows(data.train)

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(RECORDS[:2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    data = load_data(DataConfig(path=str(tmp_path / "dict"), eval_split="test", **MAPPING))
    _check_rows(data.train)
    assert [r.index for r in data.eval] == [0, 1]
    with pytest.raises(DataError, match=r"no split 'validation'; available: \['test', 'train'\]"):
        load_data(DataConfig(path=str(tmp_path / "dict"), split="validation", **MAPPING))


def test_hub_name_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_data(DataConfig(path="someorg/prompts", format="hub", **MAPPING))
    _check_rows(data.train)
    assert calls == [("someorg/prompts", "train")]


def test_eval_fraction_is_exact_deterministic_and_disjoint(tmp_path):
    records = [{"messages": f"prompt {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    a = load_data(DataConfig(path=str(path), eval_fraction=0.25, shuffle_seed=3))
    b = load_data(DataConfig(path=str(path), eval_fraction=0.25, shuffle_seed=3))
    c = load_data(DataConfig(path=str(path), eval_fraction=0.25, shuffle_seed=4))
    assert len(a.eval) == 5 and len(a.train) == 15
    assert [r.index for r in a.eval] == [r.index for r in b.eval] != [r.index for r in c.eval]
    assert sorted(r.index for r in a.train + a.eval) == list(range(20))


def test_eval_path_is_a_separate_source(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": "a"}, {"messages": "b"}])
    ev = write_parquet(tmp_path / "eval.parquet", [{"messages": "c"}])
    data = load_data(DataConfig(path=str(train), eval_path=str(ev)))
    assert [r.messages[0]["content"] for r in data.train] == ["a", "b"]
    assert [r.messages[0]["content"] for r in data.eval] == ["c"]
    assert [rep.source.split()[0] for rep in data.reports] == ["train", "eval"]


def test_system_prompt_is_added_only_where_missing(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"messages": "plain"},
        {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "x"}]}])
    rows = load_data(DataConfig(path=str(path), system_prompt="Be brief.")).train
    assert rows[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "plain"}]
    assert rows[1].messages[0] == {"role": "system", "content": "Own."}


def test_legacy_load_prompt_rows_on_quickstart():
    from trainer.config import resolve_path

    rows = load_prompt_rows(resolve_path("data/quickstart_prompts.jsonl"))
    assert len(rows) == 12 and rows[0].messages[0]["role"] == "system" and rows[0].metadata == {"id": 0}
