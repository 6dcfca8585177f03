"""Reading records from the formats users already have: JSONL (or a JSON array), Parquet, a
`datasets.save_to_disk` directory, a Hugging Face hub dataset name (when the network allows), or task generators
(`tasks`: the path names task families and agent environments, comma-separated; rewards/tasks, rewards/envs).

Every record comes with `where` ("path line 7" for JSONL, 1-based like an editor; "path row 6" for tabular data,
0-based like `ds[6]`) so that validation messages point at the exact row. Lines that are not UTF-8 or not JSON
come back as a problem instead of a record, so one bad line does not hide the rest of the report."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rollout.data.rows import DataError

FORMATS = ("auto", "jsonl", "json", "parquet", "arrow", "hub", "tasks")
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class RawRecord:
    ordinal: int                 # 0-based record number across the whole source (all shards)
    where: str
    record: Any = None
    problem: str | None = None   # set when the row could not even be decoded/parsed


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """The concrete format for `path`; `auto` never guesses `hub` (a typo must not turn into a download)."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"unknown data format {fmt!r}; known: {list(FORMATS)}")
        return fmt
    p = Path(path)
    if p.is_dir():
        if any((p / m).is_file() for m in _DATASETS_MARKERS):
            return "arrow"
        if any(p.glob("*.parquet")):
            return "parquet"
        if any(p.glob("*.jsonl")) or any(p.glob("*.json")):
            return "jsonl"
        raise DataError(f"{p}: a directory without a datasets save_to_disk layout, *.parquet or *.jsonl files")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        # HF convention: ".json" is often JSON Lines; a leading '[' means one JSON array.
        with p.open("rb") as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"{p}: cannot tell the format from the name; set data.format to one of {list(FORMATS[1:])}")


def _shards(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = sorted({f for pat in patterns for f in path.glob(pat)})
    if not files:
        raise DataError(f"{path}: no {' or '.join(patterns)} files")
    return files


def _read_jsonl(path: Path, start: int) -> Iterator[RawRecord]:
    # Binary mode and per-line decoding: a stray non-UTF-8 byte is reported with its line instead of failing the
    # whole file with a byte offset nobody can find.
    ordinal = start
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(ordinal, where, problem=f"not valid UTF-8 (byte {exc.start} of the line)")
            else:
                try:
                    yield RawRecord(ordinal, where, json.loads(text))
                except json.JSONDecodeError as exc:
                    yield RawRecord(ordinal, where, problem=f"not valid JSON ({exc.msg}, column {exc.colno})")
            ordinal += 1


def _read_json_array(path: Path, start: int) -> Iterator[RawRecord]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}); use JSONL to get per-row reports") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield RawRecord(start + i, f"{path} row {i}", record)


def _batch_rows(batch) -> list[dict[str, Any]]:
    """Rows of a pyarrow RecordBatch. A string column holding invalid UTF-8 (written by a lax writer) makes
    to_pylist fail for the whole batch; reading such columns as binary defers the error to the row and field."""
    import pyarrow as pa

    try:
        return batch.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        cols = [c.cast(pa.binary()) if pa.types.is_string(c.type) or pa.types.is_large_string(c.type) else c
                for c in batch.columns]
        return pa.RecordBatch.from_arrays(cols, names=batch.schema.names).to_pylist()


def _read_parquet(path: Path, start: int) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    ordinal, row = start, 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in _batch_rows(batch):
            yield RawRecord(ordinal, f"{path} row {row}", record)
            ordinal, row = ordinal + 1, row + 1


def _read_dataset(ds, label: str) -> Iterator[RawRecord]:
    # Batched access over the Arrow table: per-row `ds[i]` is an order of magnitude slower on large sets.
    i = 0
    for batch in ds.with_format(None).iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield RawRecord(i, f"{label} row {i}", dict(zip(keys, values)))
            i += 1


def _pick_split(obj, split: str, label: str):
    from datasets import DatasetDict

    if isinstance(obj, DatasetDict):
        if split not in obj:
            raise DataError(f"{label}: no split {split!r}; available: {sorted(obj)}")
        return obj[split]
    return obj


def generator_names(path: str) -> list[str]:
    """The task families / environments a `tasks` source names ("coding_fn,calculator")."""
    return [n.strip() for n in str(path).split(",") if n.strip()]


def family_rewards(path: str) -> dict[str, tuple[str, dict]]:
    """The reward (name, kwargs) of each task family a `tasks` source names; environments score their own."""
    from rewards.tasks import load_task_family, registered_task_families

    families = [load_task_family(n) for n in generator_names(path) if n in registered_task_families()]
    return {f.name: (f.reward, dict(f.reward_kwargs)) for f in families}


def read_generated_tasks(names: list[str], split: str, count: int, seed: int = 0,
                         counts: dict[str, int] | None = None) -> Iterator[RawRecord]:
    """`count` generated tasks of each named generator (`counts[name]` where given), in the default field names,
    family after family: the prompt and tools the model sees and the task family (the generator's name). A task
    family's row is labelled with what its reward reads; an environment's row with the environment and the whole
    task, which makes the rollout run it as an episode (rollout/agent)."""
    from rewards.envs import load_env
    from rewards.tasks import load_task_family, registered_task_families

    index = 0  # rows are numbered across all generators, as the lines of one file
    for name in names:
        count_here = (counts or {}).get(name, count)
        try:
            if name in registered_task_families():
                family = load_task_family(name)
                tasks, episodes = family.generate(split, count_here, seed), False
            else:
                tasks, episodes = load_env(name).generate_tasks(split, count_here, seed), True
        except (ValueError, TypeError) as exc:
            raise DataError(f"task generator {name!r}: {exc}") from exc
        for i, t in enumerate(tasks):
            label = {"env": name, "task": {"id": t.id, "prompt": t.prompt, "tools": t.tools, "data": t.data,
                                           "split": t.split}} if episodes else t.data
            yield RawRecord(index, f"{name}[{split}] task {i}",
                            {"messages": t.prompt, "tools": t.tools or None, "task": name, "label": label})
            index += 1


def read_records(path: str | Path, fmt: str = "auto", split: str = "train", *, generated_tasks: int = 0,
                 seed: int = 0, generated_counts: dict[str, int] | None = None) -> Iterator[RawRecord]:
    """All records of the source, in file order (shards sorted by name). `generated_tasks`, `seed`: how many
    tasks a `tasks` source makes per generator (`generated_counts` for some by name), and from which seed."""
    fmt = detect_format(path, fmt)
    if fmt == "tasks":
        yield from read_generated_tasks(generator_names(str(path)), split, generated_tasks, seed, generated_counts)
        return
    if fmt == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(str(path), split=split)
        except Exception as exc:  # network, auth or a missing split: all surface here as one message
            raise DataError(f"{path}: could not load hub dataset split {split!r} ({type(exc).__name__}: {exc})") \
                from exc
        yield from _read_dataset(ds, f"{path}[{split}]")
        return
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if fmt == "arrow":
        import datasets

        ds = _pick_split(datasets.load_from_disk(str(p)), split, str(p))
        yield from _read_dataset(ds, f"{p}" if not (p / "dataset_dict.json").is_file() else f"{p}[{split}]")
        return
    reader = {"jsonl": _read_jsonl, "json": _read_json_array, "parquet": _read_parquet}[fmt]
    patterns = {"jsonl": ("*.jsonl", "*.json"), "json": ("*.json",), "parquet": ("*.parquet",)}[fmt]
    start = 0
    for shard in _shards(p, patterns):
        last = start - 1
        for rec in reader(shard, start):
            last = rec.ordinal
            yield rec
        start = last + 1
