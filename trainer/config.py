"""Typed run configuration. Hydra composes YAML; `parse_config` turns it into these dataclasses and rejects bad
values with an error that names the field, before Ray or any engine starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rollout.config_schema import REPO_ROOT, ConfigError, build_dataclass, check as _check, resolve_path
from rollout.data.config import DataConfig, validate_data_config

__all__ = ["REPO_ROOT", "ConfigError", "DataConfig", "RunConfig", "parse_config", "resolve_path", "validate"]


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
    # APRIL (rollout/april.py): over-sample prompt groups, abort the stragglers once prompts_per_step groups
    # finished, resume their partial responses next step from a buffer (docs/design.md, "Partial rollouts").
    partial_rollout: bool = False
    over_sample_prompts: int = 0  # extra groups started per step (only with partial_rollout)
    max_staleness: int = 1  # a buffered token may be at most this many weight versions old, else regenerated


@dataclass
class TrainerConfig:
    num_steps: int = 3
    world_size: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Uneven pipeline stages (Megatron's num_layers_in_first/last_pipeline_stage), the rest split evenly.
    pipeline_first_stage_layers: int | None = None
    pipeline_last_stage_layers: int | None = None
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
    # Truncated importance sampling: weight each token by min(pi_old / pi_rollout, tis_clip); 0 = off.
    tis_clip: float = 0.0
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
class EvalConfig:
    # Generate for the data's eval rows (data.eval_path / eval_split / eval_fraction) and score them every N steps
    # and after the last step, with the weights just pushed to the engines; 0 = never.
    interval: int = 0
    max_prompts: int = 64  # the first N eval rows, the same ones every time
    samples_per_prompt: int = 1
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "slipstream"
    run_name: str | None = None
    dir: str = "outputs/wandb"


@dataclass
class CheckpointConfig:
    # Save the run (trainer state, data cursor, partial-rollout buffer, step) every N steps and after the last
    # step; 0 = never. Written to <output_dir>/checkpoints (trainer/run_checkpoint.py).
    save_interval: int = 0
    # Continue from <output_dir>/checkpoints/latest when it exists.
    resume: bool = True
    keep_last: int = 2


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/run"


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
    _check(r.over_sample_prompts >= 0, "rollout.over_sample_prompts", f"must be >= 0, got {r.over_sample_prompts}")
    _check(r.max_staleness >= 0, "rollout.max_staleness", f"must be >= 0, got {r.max_staleness}")
    _check(r.partial_rollout or r.over_sample_prompts == 0, "rollout.over_sample_prompts",
           "only takes effect with rollout.partial_rollout=true")
    _check(t.lr > 0, "trainer.lr", f"must be > 0, got {t.lr}")
    _check(cfg.checkpoint.save_interval >= 0, "checkpoint.save_interval",
           f"must be >= 0 (0 = never), got {cfg.checkpoint.save_interval}")
    e = cfg.eval
    _check(e.interval >= 0, "eval.interval", f"must be >= 0 (0 = never), got {e.interval}")
    for path, value in [("eval.max_prompts", e.max_prompts), ("eval.samples_per_prompt", e.samples_per_prompt),
                        ("eval.max_new_tokens", 1 if e.max_new_tokens is None else e.max_new_tokens)]:
        _check(value >= 1, path, f"must be >= 1, got {value}")
    _check(e.temperature >= 0, "eval.temperature", f"must be >= 0 (0 = greedy), got {e.temperature}")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    _check(t.moe_router_bias_update_rate >= 0, "trainer.moe_router_bias_update_rate",
           f"must be >= 0, got {t.moe_router_bias_update_rate}")
    _check(0 <= t.clip_eps_low < 1, "trainer.clip_eps_low", f"must be in [0, 1), got {t.clip_eps_low}")
    _check(t.clip_eps_high >= 0, "trainer.clip_eps_high", f"must be >= 0, got {t.clip_eps_high}")
    _check(t.tis_clip == 0 or t.tis_clip >= 1, "trainer.tis_clip",
           f"must be 0 (off) or >= 1 (a cap below 1 would down-weight on-policy tokens), got {t.tis_clip}")
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
    from glm5_model.megatron_config import pipeline_stage_layers
    try:
        pipeline_stage_layers(PRESETS[cfg.model.preset]["num_hidden_layers"], t.pipeline_parallel,
                              t.pipeline_first_stage_layers, t.pipeline_last_stage_layers,
                              names=("trainer.pipeline_parallel", "trainer.pipeline_first_stage_layers",
                                     "trainer.pipeline_last_stage_layers"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    num_experts = PRESETS[cfg.model.preset]["n_routed_experts"]
    _check(num_experts % t.expert_parallel == 0, "trainer.expert_parallel",
           f"must divide the model's {num_experts} experts, got {t.expert_parallel}")
    validate_data_config(cfg.data)
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


def parse_config(data: dict) -> RunConfig:
    return validate(build_dataclass(RunConfig, data, ""))
