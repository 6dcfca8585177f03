"""Typed run configuration. Hydra composes YAML; `parse_config` turns it into these dataclasses and rejects bad
values with an error that names the field, before Ray or any engine starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rollout.config import LoopConfig, RolloutConfig, validate_rollout_config
from rollout.config_schema import REPO_ROOT, ConfigError, build_dataclass, check as _check, resolve_path
from rollout.data.config import DataConfig, validate_data_config

__all__ = ["REPO_ROOT", "ConfigError", "DataConfig", "LoopConfig", "RolloutConfig", "RunConfig", "parse_config",
           "resolve_path", "validate"]


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
    # Agent episodes: how the episode's rewards reach its turns (trainer/advantages.py): outcome | episode |
    # reward_to_go.
    turn_advantage: Literal["outcome", "episode", "reward_to_go"] = "outcome"
    # Optimizer steps per rollout batch (consecutive slices of it); above 1 the PPO clip acts on how far the
    # policy moved from pi_prox, the policy before the batch's first step (one extra forward pass per batch).
    num_minibatches: int = 1
    # Behaviour correction: weight each token by pi_prox / pi_behav (the engine's logprob) -- decoupled PPO
    # (AReaL) -- truncated at tis_clip when that is set; tis_clip alone is truncated importance sampling.
    decoupled_ppo: bool = False
    tis_clip: float = 0.0  # 0 = no truncation (and, without decoupled_ppo, no weighting)
    # Train each batch on its distinct samples only, each weighing as many copies as it has, and skip samples of
    # zero advantage (trainer/batching.py:compact_items): the same gradient from fewer rows. Off while the MoE
    # router bias is updated, which counts the tokens routed.
    compact_batch: bool = True
    # Leave tokens generated more than this many policy versions ago out of the loss; None = keep all.
    max_token_age: int | None = None
    # Auxiliary-loss-free load balancing of the MoE router's selection bias; 0 keeps the checkpoint's bias.
    moe_router_bias_update_rate: float = 0.0
    seed: int = 1234
    # How weights reach the engines after each step (trainer/weight_sync, docs/weight-sync.md): tensor = colocated
    # (shared-memory / CUDA-IPC buckets), distributed = broadcast over a weight-update group, disk = HF checkpoint.
    weight_sync: Literal["tensor", "distributed", "disk"] = "tensor"
    weight_sync_bucket_mb: float = 256.0  # most a sending rank holds beyond its shard while sending
    weight_sync_verify: bool = False  # read every tensor's checksum back from every engine after each push
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
    # Rows whose task (data.task_key) is a key here are scored by that reward instead (its weight is ignored);
    # rows of a generated task family (data.format=tasks) default to the family's own reward. Agent rows are
    # scored by their environment either way.
    by_task: dict[str, RewardTermConfig] = field(default_factory=dict)
    timeout_s: float = 30.0
    max_concurrency: int = 64
    fallback_score: float = 0.0
    cache_size: int = 0
    dedupe: bool = True  # identical samples of one group scored once (rewards.RunnerSettings.dedupe)

    def terms(self) -> list[RewardTermConfig]:
        return list(self.combine) if self.combine else [RewardTermConfig(self.name or "", 1.0, dict(self.kwargs))]

    def runner_settings(self):
        """rewards.RunnerSettings of these options (ValueError naming the field when one is out of range)."""
        from rewards import RunnerSettings

        return RunnerSettings(self.timeout_s, self.max_concurrency, self.fallback_score, self.cache_size,
                              self.dedupe)


@dataclass
class WarmupConfig:
    """Supervised warm-up before RL (trainer/warmup.py): `steps` optimizer steps on demonstrations of the run's
    training rows (task families' and environments' experts), by the trainer itself; the result is cached under
    `cache_dir` by a key of everything it depends on, so a second run starts RL from it at once. 0 = none."""
    steps: int = 0         # optimizer steps; with target_nll, the most it takes
    # A task family whose last target_window steps average this loss or less is done: drawn a quarter as often
    # (rehearsed, not dropped), most steps going to the others; the warm-up ends when all are done at once.
    # None: `steps` steps, families drawn by their number of demonstrations.
    target_nll: float | None = None
    target_window: int = 20
    lr: float = 1.0e-3
    batch_size: int = 16   # demonstrations per optimizer step, at most ...
    batch_tokens: int = 4096  # ... this many tokens (rows of long families, agent episodes, come fewer per step)
    seed: int = 0
    cache_dir: str = "outputs/checkpoints/warmup"


@dataclass
class EvalConfig:
    # Generate for the data's eval rows (data.eval_path / eval_split / eval_fraction) and score them every N steps
    # and after the last step, with the weights just pushed to the engines; 0 = never.
    interval: int = 0
    at_start: bool = False  # also evaluate the starting policy (after any warm-up), logged at eval/step 0
    max_prompts: int = 64  # N eval rows, the same ones every time (taken from each task family in turn)
    samples_per_prompt: int = 1
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "slipstream"
    run_name: str | None = None
    dir: str = "outputs/wandb"
    samples_interval: int = 10  # a W&B table of sample completions every N steps (and after the last); 0 = never
    samples_per_table: int = 16


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
    loop: LoopConfig = field(default_factory=LoopConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    output_dir: str = "outputs/run"


def validate(cfg: RunConfig) -> RunConfig:
    t = cfg.trainer
    validate_rollout_config(cfg.rollout, cfg.loop)
    for path, value in [
        ("trainer.num_steps", t.num_steps), ("trainer.world_size", t.world_size),
        ("trainer.expert_parallel", t.expert_parallel), ("trainer.micro_batch_size", t.micro_batch_size),
        ("trainer.tensor_parallel", t.tensor_parallel), ("trainer.pipeline_parallel", t.pipeline_parallel),
        ("trainer.num_minibatches", t.num_minibatches),
    ]:
        _check(value >= 1, path, f"must be >= 1, got {value}")
    _check(t.max_token_age is None or t.max_token_age >= 0, "trainer.max_token_age",
           f"must be >= 0 or null, got {t.max_token_age}")
    _check(t.lr > 0, "trainer.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_sync_bucket_mb > 0, "trainer.weight_sync_bucket_mb", f"must be > 0, got {t.weight_sync_bucket_mb}")
    _check(cfg.checkpoint.save_interval >= 0, "checkpoint.save_interval",
           f"must be >= 0 (0 = never), got {cfg.checkpoint.save_interval}")
    _check(cfg.logging.samples_interval >= 0, "logging.samples_interval",
           f"must be >= 0 (0 = never), got {cfg.logging.samples_interval}")
    _check(cfg.logging.samples_per_table >= 1, "logging.samples_per_table",
           f"must be >= 1, got {cfg.logging.samples_per_table}")
    w = cfg.warmup
    _check(w.steps >= 0, "warmup.steps", f"must be >= 0 (0 = no warm-up), got {w.steps}")
    _check(w.lr > 0, "warmup.lr", f"must be > 0, got {w.lr}")
    _check(w.batch_size >= 1, "warmup.batch_size", f"must be >= 1, got {w.batch_size}")
    _check(w.batch_tokens >= 1, "warmup.batch_tokens", f"must be >= 1, got {w.batch_tokens}")
    _check(w.target_nll is None or w.target_nll > 0, "warmup.target_nll",
           f"must be > 0 or null (train every family for warmup.steps), got {w.target_nll}")
    _check(w.target_window >= 1, "warmup.target_window", f"must be >= 1, got {w.target_window}")
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
    # The schema checked the name; only 'te' asks whether CUDA is there, which imports torch: the driver's
    # other checks leave it out (trainer/launch.py starts the engines before the driver imports torch).
    if cfg.model.layer_spec == "te":
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
    _check_checkpoint_source(cfg.model, PRESETS[cfg.model.preset])
    num_experts = PRESETS[cfg.model.preset]["n_routed_experts"]
    _check(num_experts % t.expert_parallel == 0, "trainer.expert_parallel",
           f"must divide the model's {num_experts} experts, got {t.expert_parallel}")
    validate_data_config(cfg.data)
    from rewards import load_reward
    for i, term in enumerate(cfg.reward.terms()):
        where = f"reward.combine[{i}]" if cfg.reward.combine else "reward"
        try:
            load_reward(term.name, term.kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}.name: {exc}") from exc
    for task, term in cfg.reward.by_task.items():
        try:
            load_reward(term.name, term.kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"reward.by_task.{task}.name: {exc}") from exc
    try:
        cfg.reward.runner_settings()
    except ValueError as exc:
        raise ConfigError(f"reward.{exc}") from exc
    return cfg


# Above this many parameters a missing checkpoint is a mistake (a wrong path), not a request for random weights.
RANDOM_INIT_MAX_PARAMS = 2_000_000_000


def _check_checkpoint_source(model: ModelConfig, hf_config: dict) -> None:
    from glm5_model.param_count import count_params

    if (resolve_path(model.checkpoint_dir) / "config.json").is_file():
        return
    total = count_params(hf_config).total
    _check(total <= RANDOM_INIT_MAX_PARAMS, "model.checkpoint_dir",
           f"no checkpoint at {model.checkpoint_dir} (no config.json); {model.preset} has {total / 1e9:.0f}B "
           f"parameters, too many to initialise at random: convert the published weights (python -m "
           f"glm5_model.convert) and point model.checkpoint_dir at them")


def parse_config(data: dict) -> RunConfig:
    return validate(build_dataclass(RunConfig, data, ""))
