"""The dataset section of the run config (`data.*`) and its checks; trainer/config.py embeds it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rollout.config_schema import ConfigError, check as _check, resolve_path


@dataclass
class DataConfig:
    """Prompt dataset; see rollout/data. Optional columns (label/task/tools) may be absent from a row; null keys
    turn a column off. Structural checks run on every row, token-length checks on `validate_rows` of them."""
    path: str = "data/quickstart_prompts.jsonl"   # file, directory (shards or save_to_disk), hub name, or
    # (format tasks) task families / environments, comma-separated: "factuality_qa,coding_fn,calculator"
    format: Literal["auto", "jsonl", "json", "parquet", "arrow", "hub", "tasks"] = "auto"  # auto: never hub/tasks
    split: str = "train"                 # split of a DatasetDict directory / hub dataset / generator ("heldout")
    messages_key: str = "messages"       # chat messages (list of {role, content, ...}) or a plain-string prompt
    label_key: str | None = "label"
    task_key: str | None = "task"        # task family
    tools_key: str | None = "tools"      # list of tool schemas, or a JSON string of one
    require_label: bool = False
    system_prompt: str | None = None     # prepended to rows without a system message
    shuffle: bool = True
    shuffle_seed: int = 0
    epochs: int | None = None            # None: endless
    eval_path: str | None = None         # separate eval source (same format and mapping) ...
    eval_split: str | None = None        # ... or another split of `path` / `eval_path` ...
    eval_fraction: float = 0.0           # ... or hold this fraction of train rows out, chosen by shuffle_seed
    # format tasks: each generator makes this many train tasks (and eval tasks, from the split data.eval_split
    # names, usually "heldout"), drawn from shuffle_seed.
    generated_tasks: int = 256
    generated_eval_tasks: int = 32
    # format tasks: train tasks of the named generators instead of generated_tasks (each generator's share of the
    # training rows, so of every batch), e.g. {factuality_qa: 200, coding_fn: 100}.
    generated_tasks_by_name: dict[str, int] = field(default_factory=dict)
    max_prompt_tokens: int | None = None
    validate_rows: int | Literal["all"] = "all"
    on_invalid: Literal["strict", "skip"] = "strict"


def validate_data_config(d: DataConfig) -> DataConfig:
    """Checks that need no tokenizer; errors name the field (data.<field>: ...)."""
    from rollout.data.formats import detect_format
    from rollout.data.rows import DataError

    if d.format == "tasks":
        _validate_generated_source(d)
    _check(d.format == "tasks" or not d.generated_tasks_by_name, "data.generated_tasks_by_name",
           f"only generated tasks (data.format=tasks) have per-generator counts; data.format is {d.format!r}")
    for key in ("path", "eval_path"):
        value = getattr(d, key)
        if value is None or d.format in ("hub", "tasks"):
            continue
        p = resolve_path(value)
        _check(p.exists(), f"data.{key}", f"no such file or directory: {p}")
        try:
            fmt = detect_format(p, d.format)
        except DataError as exc:
            raise ConfigError(f"data.format: {exc}") from exc
        _check(fmt != "arrow" or p.is_dir(), f"data.{key}", f"format 'arrow' (datasets.save_to_disk) needs a "
               f"directory, got {p}")
        _check(d.eval_split is None or key != "path" or d.eval_path is not None or fmt == "arrow",
               "data.eval_split", f"splits exist only in datasets directories and hub datasets, not {fmt} files; "
               "use data.eval_path or data.eval_fraction")
    _check(bool(d.messages_key), "data.messages_key", "must name the prompt/messages field")
    for key, value in (("epochs", d.epochs), ("max_prompt_tokens", d.max_prompt_tokens)):
        _check(value is None or value >= 1, f"data.{key}", f"must be >= 1, got {value}")
    _check(d.validate_rows == "all" or d.validate_rows >= 1, "data.validate_rows",
           f"must be 'all' or >= 1, got {d.validate_rows}")
    _check(0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    _check(d.eval_fraction == 0 or (d.eval_path is None and d.eval_split is None), "data.eval_fraction",
           "set either an eval source (data.eval_path / data.eval_split) or data.eval_fraction, not both")
    return d


def _validate_generated_source(d: DataConfig) -> None:
    from rewards.envs import load_env
    from rewards.envs.registry import SPLITS
    from rewards.tasks import registered_task_families
    from rollout.data.formats import generator_names

    for key in ("path", "eval_path"):
        value = getattr(d, key)
        if value is None:
            continue
        names = generator_names(value)
        _check(bool(names), f"data.{key}", "name at least one task family or environment")
        _check(len(set(names)) == len(names), f"data.{key}", f"a generator is named twice: {value!r}")
        for name in names:
            if name in registered_task_families():
                continue
            try:
                spec = load_env(name)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"data.{key}: {name!r} is no task family ({registered_task_families()}) and no "
                                  f"environment: {exc}") from exc
            _check(spec.tasks is not None, f"data.{key}", f"environment {name!r} has no task generator; with "
                   "data.format=tasks its tasks come from one (or use a dataset whose labels name the environment)")
    for key in ("split", "eval_split"):
        value = getattr(d, key)
        _check(value is None or value in SPLITS, f"data.{key}", f"generated tasks have splits {list(SPLITS)}, "
               f"got {value!r}")
    _check(d.eval_split is None or d.eval_path is not None or d.eval_split != d.split, "data.eval_split",
           f"the eval split must differ from the train split ({d.split!r}) of the same generators")
    for key, value in (("generated_tasks", d.generated_tasks), ("generated_eval_tasks", d.generated_eval_tasks)):
        _check(value >= 1, f"data.{key}", f"must be >= 1, got {value}")
    names = generator_names(d.path)
    for name, count in d.generated_tasks_by_name.items():
        _check(name in names, f"data.generated_tasks_by_name.{name}",
               f"{name!r} is not one of data.path's generators {names}")
        _check(isinstance(count, int) and not isinstance(count, bool) and count >= 1,
               f"data.generated_tasks_by_name.{name}", f"must be an integer >= 1, got {count!r}")
