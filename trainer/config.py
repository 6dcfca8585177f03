"""Typed run configuration. Hydra composes YAML; `parse_config` turns it into these dataclasses and rejects bad
values with an error that names the field, before Ray or any engine starts."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted field name."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    # HF-format checkpoint directory; created from the preset with `init_seed` when it does not exist yet.
    checkpoint_dir: str = "outputs/checkpoints/tiny-init"
    init_seed: int = 1234
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Megatron layer modules: auto = TransformerEngine with a GPU and transformer_engine, else local (CPU).
    layer_spec: Literal["auto", "local", "te"] = "auto"


@dataclass
class RolloutConfig:
    num_engines: int = 1
    prompts_per_step: int = 4
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_total_tokens: int = 16384  # KV-cache size per engine; SGLang would otherwise take most of RAM on CPU
    engine_start_timeout_s: float = 300.0
    engine_cpus: float = 1.0


@dataclass
class TrainerConfig:
    num_steps: int = 3
    world_size: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = True  # only takes effect with tensor_parallel > 1
    expert_parallel: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    advantage_eps: float = 1e-6
    # Auxiliary-loss-free load balancing of the MoE router's selection bias; 0 keeps the checkpoint's bias.
    moe_router_bias_update_rate: float = 0.0
    seed: int = 1234
    weight_sync: Literal["tensor", "disk"] = "tensor"
    cpus_per_rank: float = 1.0


@dataclass
class RewardTermConfig:
    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    """One reward (`name`, `kwargs`) or a weighted sum (`combine`, which then replaces `name`)."""

    name: str | None = "char_fraction"
    kwargs: dict[str, Any] = field(default_factory=dict)
    combine: list[RewardTermConfig] = field(default_factory=list)
    timeout_s: float = 30.0
    max_concurrency: int = 64
    fallback_score: float = 0.0
    cache_size: int = 0

    def terms(self) -> list[RewardTermConfig]:
        return list(self.combine) if self.combine else [RewardTermConfig(self.name or "", 1.0, dict(self.kwargs))]


@dataclass
class DataConfig:
    """Prompt dataset; see rollout/data. Optional columns (label/task/tools) may be absent from a row; null keys
    turn a column off. Structural checks run on every row, token-length checks on `validate_rows` of them."""
    path: str = "data/quickstart_prompts.jsonl"   # file, directory (shards or save_to_disk), or a hub name
    format: Literal["auto", "jsonl", "json", "parquet", "arrow", "hub"] = "auto"  # auto never means hub
    split: str = "train"                 # split of a DatasetDict directory / hub dataset
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
    max_prompt_tokens: int | None = None
    validate_rows: int | Literal["all"] = "all"
    on_invalid: Literal["strict", "skip"] = "strict"


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "slipstream"
    run_name: str | None = None
    dir: str = "outputs/wandb"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "outputs/run"


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation in (int, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field (known: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _check(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {message}")


def validate(cfg: RunConfig) -> RunConfig:
    r, t = cfg.rollout, cfg.trainer
    for path, value in [
        ("rollout.num_engines", r.num_engines), ("rollout.prompts_per_step", r.prompts_per_step),
        ("rollout.max_new_tokens", r.max_new_tokens), ("rollout.max_total_tokens", r.max_total_tokens),
        ("trainer.num_steps", t.num_steps), ("trainer.world_size", t.world_size),
        ("trainer.expert_parallel", t.expert_parallel), ("trainer.micro_batch_size", t.micro_batch_size),
        ("trainer.tensor_parallel", t.tensor_parallel), ("trainer.pipeline_parallel", t.pipeline_parallel),
    ]:
        _check(value >= 1, path, f"must be >= 1, got {value}")
    _check(r.samples_per_prompt >= 2, "rollout.samples_per_prompt",
           f"GRPO needs at least 2 samples per prompt to normalise within a group, got {r.samples_per_prompt}")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(t.lr > 0, "trainer.lr", f"must be > 0, got {t.lr}")
    _check(t.moe_router_bias_update_rate >= 0, "trainer.moe_router_bias_update_rate",
           f"must be >= 0, got {t.moe_router_bias_update_rate}")
    _check(0 <= t.clip_eps_low < 1, "trainer.clip_eps_low", f"must be in [0, 1), got {t.clip_eps_low}")
    _check(t.clip_eps_high >= 0, "trainer.clip_eps_high", f"must be >= 0, got {t.clip_eps_high}")
    _check(t.world_size % t.expert_parallel == 0, "trainer.expert_parallel",
           f"must divide trainer.world_size ({t.world_size}), got {t.expert_parallel}")
    _check(t.world_size % (t.tensor_parallel * t.pipeline_parallel) == 0, "trainer.tensor_parallel",
           f"tensor_parallel x pipeline_parallel ({t.tensor_parallel} x {t.pipeline_parallel}) must divide "
           f"trainer.world_size ({t.world_size})")
    from glm5_model.presets import PRESETS
    _check(cfg.model.preset in PRESETS, "model.preset", f"unknown preset {cfg.model.preset!r}; known: {sorted(PRESETS)}")
    from glm5_model.model import use_transformer_engine
    try:
        use_transformer_engine(cfg.model.layer_spec)
    except ValueError as exc:
        raise ConfigError(f"model.{exc}") from exc
    heads = PRESETS[cfg.model.preset]["num_attention_heads"]
    _check(heads % t.tensor_parallel == 0, "trainer.tensor_parallel",
           f"must divide the model's {heads} attention heads, got {t.tensor_parallel}")
    layers = PRESETS[cfg.model.preset]["num_hidden_layers"]
    _check(layers % t.pipeline_parallel == 0, "trainer.pipeline_parallel",
           f"must divide the model's {layers} layers, got {t.pipeline_parallel}")
    num_experts = PRESETS[cfg.model.preset]["n_routed_experts"]
    _check(num_experts % t.expert_parallel == 0, "trainer.expert_parallel",
           f"must divide the model's {num_experts} experts, got {t.expert_parallel}")
    d = cfg.data
    from rollout.data import DataError, detect_format
    for key in ("path", "eval_path"):
        value = getattr(d, key)
        if value is None or d.format == "hub":
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
    from rewards import RunnerSettings, load_reward
    for i, term in enumerate(cfg.reward.terms()):
        where = f"reward.combine[{i}]" if cfg.reward.combine else "reward"
        try:
            load_reward(term.name, term.kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}.name: {exc}") from exc
    try:
        RunnerSettings(cfg.reward.timeout_s, cfg.reward.max_concurrency, cfg.reward.fallback_score,
                       cfg.reward.cache_size)
    except ValueError as exc:
        raise ConfigError(f"reward.{exc}") from exc
    return cfg


def resolve_path(path: str) -> Path:
    """Relative paths in the config are relative to the repository, so runs behave the same from any cwd."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def parse_config(data: dict) -> RunConfig:
    return validate(_build(RunConfig, data, ""))
