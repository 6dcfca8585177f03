"""The first half of a run's start (trainer/main.py): the checks (before Ray), Ray, the warm-up when one is
configured, then the SGLang engines and the rollout manager. Nothing here imports torch (nor does the engine
actor's module, rollout/engine.py): the engines' start is the longest (their imports, one core each), and the
driver's own torch import (1 s) would delay it. The trainer's side (trainer/runtime.py: the Megatron ranks, W&B)
is imported and started after, while the engines come up."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from glm5_model.hf_checkpoint import ensure_checkpoint
from rewards import RewardSpec
from rollout.data import PromptRow, load_data
from rollout.data.formats import family_rewards
from rollout.manager import EngineSpec, RolloutManagerActor, start_engine, start_engines
from trainer.config import ConfigError, RunConfig, resolve_path
from trainer.run_checkpoint import check_resumable, latest_checkpoint, read_run_state
from trainer.step_clock import StartupClock

# Warnings the actors' libraries print at import on every CPU run, none of which a user can act on: no
# TransformerEngine/Apex (CPU), SGLang's GPU-only quantization and Triton notices, torch deprecations inside
# SGLang and Megatron. PYTHONWARNINGS reaches the actors and SGLang's scheduler processes (each message is matched
# at its start); every other warning still shows.
QUIET_WARNINGS = ",".join(f"ignore:{message}" for message in (
    "Transformer Engine and Apex are not installed", "Apex is not installed",
    "Only CUDA",  # ... HIP and XPU support AWQ / MUSA and NPU support GGUF (a comma would end the filter)
    "Triton is not supported on current platform", "full scope is deprecated",
    "`torch.jit.script_method` is deprecated", "`torch.distributed.reduce_op` is deprecated"))


@dataclass
class Launched:
    """What the trainer's side of the start takes over."""

    checkpoint: Path                 # the weights RL starts from (the warmed-up ones after a warm-up)
    rollout: Any                     # the rollout manager actor; its engines may still be starting
    eval_rows: list[PromptRow]
    stop_token_ids: tuple[int, ...]
    resume_from: tuple[Path, dict] | None  # the newest run checkpoint and its state, when resuming
    startup: StartupClock


def launch(cfg: RunConfig, manager_actor=RolloutManagerActor) -> Launched:
    """`manager_actor`: RolloutManagerActor or a Ray actor class of a RolloutManager subclass."""
    from glm5_model.tokenizer import load_tokenizer
    from glm5_model.tokenizer.build import stop_token_ids

    # Measured in bench/startup.py. Importing torch and the trainer's side in a thread during the checks and
    # ray.init (tried) held the GIL against both: the engines started 1 s later than they do with no thread.
    startup = StartupClock()
    checkpoint = ensure_checkpoint(cfg.model.preset, resolve_path(cfg.model.checkpoint_dir), cfg.model.init_seed)
    tokenizer = load_tokenizer(checkpoint)
    data = load_data(cfg.data, tokenizer)  # the validation pass: strict mode stops here, before Ray starts
    if cfg.eval.interval and not data.eval:
        raise ConfigError("eval.interval: the data has no eval rows; set data.eval_path, data.eval_split or "
                          "data.eval_fraction")
    resume_from = latest_checkpoint(resolve_path(cfg.output_dir)) if cfg.checkpoint.resume else None
    saved = read_run_state(resume_from) if resume_from else None
    if saved is not None:
        check_resumable(resume_from, saved, cfg.rollout)
    startup.mark("checks")  # the initial checkpoint, tokenizer, data, the run checkpoint to resume
    if not ray.is_initialized():
        r = cfg.rollout
        needed = r.num_engines * r.engine_cpus + cfg.trainer.world_size * cfg.trainer.cpus_per_rank
        # In the environment Ray's processes inherit, not a runtime_env: actors with a runtime_env of their own
        # cannot take the workers Ray starts ahead with ray.init (each actor waited ~0.7 s longer to begin).
        user_filters = os.environ.get("PYTHONWARNINGS", "")
        if QUIET_WARNINGS not in user_filters:
            os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (user_filters, QUIET_WARNINGS)))
        # Logical CPUs: actors mostly wait on each other, so we let them share the physical cores.
        ray.init(num_cpus=max(int(needed) + 1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)
    startup.mark("ray")
    if cfg.warmup.steps:  # supervised warm-up on demonstrations (cached): RL starts from its weights
        from trainer.warmup import warm_up

        checkpoint = warm_up(cfg, checkpoint, data.train, tokenizer)
        startup.mark("warmup")
    r, term_cfg = cfg.rollout, cfg.reward
    engines = EngineSpec(str(checkpoint), r.num_engines, cfg.model.dtype, r.max_total_tokens, cfg.trainer.seed,
                         r.engine_start_timeout_s, r.engine_cpus)
    # The engines first, the manager beside them; the ranks start once trainer/runtime.py is imported.
    engine_handles = start_engines(engines)
    rollout = manager_actor.options(num_cpus=0).remote(
        r, cfg.loop, cfg.data, data.train, engines,
        [RewardSpec(t.name, t.weight, t.kwargs) for t in term_cfg.terms()],
        term_cfg.runner_settings(),
        engine_handles=engine_handles, engine_factory=functools.partial(start_engine, engines),
        task_rewards=task_rewards(cfg))
    startup.mark("engines_started")
    return Launched(Path(checkpoint), rollout, data.eval, tuple(stop_token_ids(tokenizer)),
                    (resume_from, saved) if saved else None, startup)


def task_rewards(cfg: RunConfig) -> dict[str, list[RewardSpec]]:
    """Rewards by row task: a generated task family's own (data.format=tasks), then reward.by_task."""
    families = family_rewards(cfg.data.path) if cfg.data.format == "tasks" else {}
    out = {task: [RewardSpec(name, 1.0, kwargs)] for task, (name, kwargs) in families.items()}
    out.update({task: [RewardSpec(t.name, 1.0, t.kwargs)] for task, t in cfg.reward.by_task.items()})
    return out
