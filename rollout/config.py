"""The rollout and loop sections of the run config (`rollout.*`, `loop.*`) and their checks. They live here, not in
trainer/config.py, because the rollout manager consumes them and rollout must not import trainer; the trainer's
RunConfig embeds them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rollout.config_schema import check as _check
from rollout.flow import FlowSettings

LoopMode = Literal["sync", "one_step_off", "async"]


@dataclass
class AgentConfig:
    """Multi-turn (agent) rows: those whose label names an environment ({"env": ..., "task": {...}}; the `env`
    data format makes such rows from an environment's task generator). rewards/envs runs the environments."""
    max_turns: int = 8
    max_tokens: int = 512          # model + observation tokens of one episode's response
    step_timeout_s: float = 30.0
    episode_timeout_s: float = 300.0
    on_env_error: Literal["end", "reply"] = "end"  # an environment that raises: end the episode, or tell the model
    env_kwargs: dict = field(default_factory=dict)  # passed to every environment's factory


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
    # Engine pool (rollout/engine_pool.py): each engine is checked every health_interval_s; one whose check
    # fails or does not answer within health_timeout_s is killed, its requests requeued, and a replacement
    # started (at most max_engine_restarts over the run).
    health_interval_s: float = 5.0
    health_timeout_s: float = 60.0
    max_engine_restarts: int = 20
    # An OpenAI-compatible HTTP endpoint onto the engines (rollout/openai_server.py) for agent harnesses:
    # None = off, 0 = any free port. The API key, if any, is read from the environment variable named here.
    openai_port: int | None = None
    openai_host: str = "127.0.0.1"
    openai_api_key_env: str | None = None
    # An aborted sample (a straggler, a weight push with loop.pause_mode=abort, a checkpoint) keeps its tokens and
    # resumes from them; false: it restarts from its prompt.
    partial_rollout: bool = False
    # APRIL (loop.mode=sync only): start this many extra groups per step, abort the stragglers once
    # prompts_per_step groups finished, resume them next step (docs/design.md, "Rollout manager and loop modes").
    over_sample_prompts: int = 0
    # A trained token is at most this many policy versions older than the policy being trained.
    max_staleness: int = 1
    # What happens to a group past the bound at batch time: regenerate its stale samples, drop it, or train it
    # with its stale tokens masked out of the loss. Counted either way.
    stale_policy: Literal["regenerate", "drop", "mask"] = "regenerate"
    # Dynamic sampling (DAPO): drop groups whose rewards are all equal (no GRPO signal) and refill the batch.
    dynamic_sampling: bool = False
    agent: AgentConfig = field(default_factory=AgentConfig)


@dataclass
class LoopConfig:
    # sync: generate -> train -> push, nothing overlaps. one_step_off: batch k+1 is generated (with the weights
    # before step k) while step k trains; a push waits for in-flight generation. async: engines stay busy all the
    # time, up to rollout.max_staleness batches ahead; a push pauses or aborts in-flight requests (pause_mode).
    mode: LoopMode = "sync"
    sync_interval: int = 1  # push weights every N train steps (async only)
    # async: what a weight push does to in-flight requests. retract: SGLang requeues them and recomputes their KV
    # under the new weights; in_place: they keep their KV cache from the old weights (fastest, a little
    # off-policy); abort: they return their partial tokens and are resumed (rollout.partial_rollout) or restarted.
    pause_mode: Literal["retract", "in_place", "abort"] = "retract"
    batch_timeout_s: float = 1800.0  # fail a step that waits longer than this for its batch


def validate_rollout_config(r: RolloutConfig, loop: LoopConfig) -> None:
    for path, value in [("rollout.num_engines", r.num_engines), ("rollout.prompts_per_step", r.prompts_per_step),
                        ("rollout.max_new_tokens", r.max_new_tokens),
                        ("rollout.max_total_tokens", r.max_total_tokens), ("loop.sync_interval", loop.sync_interval)]:
        _check(value >= 1, path, f"must be >= 1, got {value}")
    _check(r.samples_per_prompt >= 2, "rollout.samples_per_prompt",
           f"GRPO needs at least 2 samples per prompt to normalise within a group, got {r.samples_per_prompt}")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.over_sample_prompts >= 0, "rollout.over_sample_prompts", f"must be >= 0, got {r.over_sample_prompts}")
    _check(r.max_staleness >= 0, "rollout.max_staleness", f"must be >= 0, got {r.max_staleness}")
    _check(r.partial_rollout or r.over_sample_prompts == 0, "rollout.over_sample_prompts",
           "only takes effect with rollout.partial_rollout=true")
    _check(loop.batch_timeout_s > 0, "loop.batch_timeout_s", f"must be > 0, got {loop.batch_timeout_s}")
    _check(r.health_interval_s > 0, "rollout.health_interval_s", f"must be > 0, got {r.health_interval_s}")
    _check(r.health_timeout_s > r.health_interval_s, "rollout.health_timeout_s",
           f"must be > rollout.health_interval_s ({r.health_interval_s}), got {r.health_timeout_s}")
    if r.openai_port is not None:
        _check(0 <= r.openai_port < 65536, "rollout.openai_port", f"must be a port number, got {r.openai_port}")
    if r.openai_api_key_env is not None:
        import os

        _check(bool(os.environ.get(r.openai_api_key_env)), "rollout.openai_api_key_env",
               f"the environment variable {r.openai_api_key_env} is not set (or empty)")
    a = r.agent
    for path, value in [("rollout.agent.max_turns", a.max_turns), ("rollout.agent.max_tokens", a.max_tokens)]:
        _check(value >= 1, path, f"must be >= 1, got {value}")
    for path, value in [("rollout.agent.step_timeout_s", a.step_timeout_s),
                        ("rollout.agent.episode_timeout_s", a.episode_timeout_s)]:
        _check(value > 0, path, f"must be > 0, got {value}")
    _check(r.max_engine_restarts >= 0, "rollout.max_engine_restarts", f"must be >= 0, got {r.max_engine_restarts}")
    if loop.mode != "sync":
        _check(r.over_sample_prompts == 0, "rollout.over_sample_prompts",
               f"over-sampling (APRIL) is a loop.mode=sync option; {loop.mode} keeps the engines busy without it")
        _check(r.max_staleness >= 1, "rollout.max_staleness",
               f"loop.mode={loop.mode} trains tokens at least one version old; needs >= 1, got {r.max_staleness}")
    if loop.mode == "async":
        _check(loop.sync_interval <= r.max_staleness, "loop.sync_interval",
               f"pushing every {loop.sync_interval} steps makes tokens up to {loop.sync_interval} versions old "
               f"before generation can run ahead; needs <= rollout.max_staleness ({r.max_staleness})")
    else:
        _check(loop.sync_interval == 1, "loop.sync_interval",
               f"only loop.mode=async pushes weights less often than every step, got {loop.sync_interval}")


def flow_settings(r: RolloutConfig, loop: LoopConfig) -> FlowSettings:
    """How the loop mode maps onto the rollout flow's admission rule and batch order (rollout/flow.py)."""
    admission = {"sync": 0, "one_step_off": 1, "async": r.max_staleness}[loop.mode]
    return FlowSettings(groups_per_batch=r.prompts_per_step, group_size=r.samples_per_prompt,
                        max_new_tokens=r.max_new_tokens, max_staleness=r.max_staleness,
                        admission_staleness=admission, over_sample=r.over_sample_prompts,
                        batch_order="finish" if r.over_sample_prompts else "admission",
                        stale_policy=r.stale_policy, partial_rollout=r.partial_rollout,
                        dynamic_sampling=r.dynamic_sampling)
