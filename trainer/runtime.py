"""What the loop in trainer/main.py drives: engines, trainer ranks, data, reward and logging, one call each."""
from __future__ import annotations

import dataclasses
import logging
import os
import statistics
from pathlib import Path

import ray
import torch

from glm5_model.hf_checkpoint import ensure_checkpoint
from glm5_model.tokenizer.build import stop_token_ids
from rewards import RewardRunner, RewardSpec, RunnerSettings, reward_batch_metrics
from rollout.april import generate_april
from rollout.buffer import RolloutBufferActor
from rollout.data import DataExhausted, PromptRow, PromptSource, load_data, make_source, render_prompt
from rollout.engine import RolloutEngineActor
from rollout.generation import SamplingSettings, generate_groups, make_group, score_samples
from rollout.sample import Sample
from trainer.batching import TrainItem
from trainer.config import ConfigError, RunConfig, resolve_path
from trainer.group import TrainerGroup
from trainer.losses import grpo_advantages
from trainer.run_checkpoint import check_resumable, latest_checkpoint, read_run_state, save_checkpoint

log = logging.getLogger("slipstream")


class Runtime:
    def __init__(self, cfg: RunConfig, checkpoint: Path, engines: list, trainer: TrainerGroup, tokenizer,
                 data: PromptSource, wandb_run, resume_from: tuple[Path, dict] | None = None,
                 eval_rows: list[PromptRow] | None = None):
        self.cfg, self.checkpoint, self.engines, self.trainer = cfg, checkpoint, engines, trainer
        self.resume_from, self.eval_rows = resume_from, eval_rows or []  # (checkpoint dir, its run state)
        self.tokenizer, self.data, self.wandb_run = tokenizer, data, wandb_run
        r = cfg.reward
        self.rewards = RewardRunner([RewardSpec(t.name, t.weight, t.kwargs) for t in r.terms()],
                                    RunnerSettings(r.timeout_s, r.max_concurrency, r.fallback_score, r.cache_size))
        self.settings = SamplingSettings(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                                         tuple(stop_token_ids(tokenizer)))
        self.output_dir = resolve_path(cfg.output_dir)
        # APRIL: partial groups live in an actor between steps (see rollout/april.py).
        self.buffer = (RolloutBufferActor.options(num_cpus=0).remote(cfg.rollout.max_staleness)
                       if cfg.rollout.partial_rollout else None)
        self._april_metrics: dict[str, float] = {}

    @classmethod
    def start(cls, cfg: RunConfig) -> "Runtime":
        from transformers import AutoTokenizer

        checkpoint = ensure_checkpoint(cfg.model.preset, resolve_path(cfg.model.checkpoint_dir), cfg.model.init_seed)
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        data = load_data(cfg.data, tokenizer)  # the validation pass: strict mode stops here, before Ray starts
        if cfg.eval.interval and not data.eval:
            raise ConfigError("eval.interval: the data has no eval rows; set data.eval_path, data.eval_split or "
                              "data.eval_fraction")
        resume_from = latest_checkpoint(resolve_path(cfg.output_dir)) if cfg.checkpoint.resume else None
        saved = read_run_state(resume_from) if resume_from else None
        if saved is not None:
            check_resumable(resume_from, saved, cfg.rollout.partial_rollout)
        if not ray.is_initialized():
            needed = cfg.rollout.num_engines * cfg.rollout.engine_cpus + cfg.trainer.world_size * cfg.trainer.cpus_per_rank
            # Logical CPUs: actors mostly wait on each other, so we let them share the physical cores.
            ray.init(num_cpus=max(int(needed) + 1, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=True)
        engines = [RolloutEngineActor.options(num_cpus=cfg.rollout.engine_cpus).remote(
                       str(checkpoint), dtype=cfg.model.dtype, max_total_tokens=cfg.rollout.max_total_tokens,
                       seed=cfg.trainer.seed + i, start_timeout_s=cfg.rollout.engine_start_timeout_s)
                   for i in range(cfg.rollout.num_engines)]
        trainer = TrainerGroup(cfg.trainer, str(checkpoint), layer_spec=cfg.model.layer_spec)
        ray.get([e.weight_version.remote() for e in engines])  # engines are up
        wandb_run = _init_wandb(cfg, resume_id=saved.get("wandb_run_id") if saved else None)
        return cls(cfg, checkpoint, engines, trainer, tokenizer, make_source(cfg.data, data.train), wandb_run,
                   (resume_from, saved) if saved is not None else None, data.eval)

    def resume(self) -> int:
        """Restores the newest run checkpoint, if resuming: trainer state, data cursor and partial-rollout buffer,
        and pushes the restored weights to the engines. Returns the step to continue from (0 for a fresh run)."""
        if self.resume_from is None:
            return 0
        path, state = self.resume_from
        try:
            self.trainer.load_state(str(path / "trainer"))
        except ray.exceptions.RayTaskError as exc:  # e.g. saved with another layout: the rank names the fields
            raise ConfigError(f"trainer: cannot resume from {path}: {getattr(exc, 'cause', exc)}") from exc
        self.data.load_state(state["data"])
        if self.buffer is not None and state.get("buffer") is not None:  # (Runtime.start checked the opposite)
            ray.get(self.buffer.load_state_dict.remote(state["buffer"]))
        self.sync_weights(state["weight_version"])
        print(f"resumed from {path} at step {state['next_step'] + 1}", flush=True)
        return state["next_step"]

    def save_checkpoint(self, step: int) -> None:
        """A run checkpoint after `step` (0-based) every checkpoint.save_interval steps and after the last one."""
        if not self._due(self.cfg.checkpoint.save_interval, step):
            return
        run_state = {"weight_version": step + 1, "data": self.data.state(),
                     "buffer": ray.get(self.buffer.state_dict.remote()) if self.buffer is not None else None,
                     "wandb_run_id": self.wandb_run.id if self.wandb_run is not None else None}
        path = save_checkpoint(self.output_dir, step + 1, run_state, lambda d: self.trainer.save_state(str(d)),
                               self.cfg.checkpoint.keep_last)
        log.info("run checkpoint: %s", path)

    def generate(self, step: int) -> list[Sample]:
        r = self.cfg.rollout
        if self.buffer is None:
            rows = self.data.next_batch(r.prompts_per_step)
            prompt_ids = [render_prompt(self.tokenizer, row) for row in rows]
            return generate_groups(self.engines, rows, prompt_ids, r.samples_per_prompt, self.settings,
                                   first_group_id=step * len(rows))
        per_step = r.prompts_per_step + r.over_sample_prompts

        def new_groups(n: int) -> list[list[Sample]]:
            # Group ids stay unique across steps: a step starts at most `per_step` fresh groups.
            rows = self.data.next_batch(n) if n and not self.data.exhausted else []
            return [make_group(row, render_prompt(self.tokenizer, row), step * per_step + i, r.samples_per_prompt)
                    for i, row in enumerate(rows)]

        result = generate_april(self.engines, self.buffer, new_groups, self.settings,
                                target_groups=r.prompts_per_step, over_sample_groups=r.over_sample_prompts,
                                version=step,
                                decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        if not result.samples:
            raise DataExhausted("no prompt group finished: the data is exhausted and the partial-rollout buffer "
                                "has nothing left to finish")
        self._april_metrics = {f"rollout/april/{k}": v for k, v in result.metrics.items()}
        return result.samples

    def score(self, samples: list[Sample]) -> None:
        score_samples(samples, self.rewards)

    def train(self, samples: list[Sample]) -> dict[str, float]:
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        advantages = grpo_advantages(rewards, self.cfg.rollout.samples_per_prompt, self.cfg.trainer.advantage_eps)
        items = [TrainItem(s.tokens, len(s.prompt_ids), float(a), s.response_logprobs)
                 for s, a in zip(samples, advantages.tolist()) if s.response_length > 0]
        return self.trainer.train_step(items)

    def sync_weights(self, version: int) -> None:
        if self.cfg.trainer.weight_sync == "disk":
            path = self.trainer.save_hf_checkpoint(str(self.output_dir / "weights" / f"v{version}"))
            ray.get([e.update_weights_from_disk.remote(path, version) for e in self.engines])
        else:
            ref = self.trainer.export_weights()
            ray.get([e.update_weights_from_tensors.remote(ref, version) for e in self.engines])

    def _due(self, interval: int, step: int) -> bool:
        """Whether a periodic stage runs after `step` (0-based): every `interval` steps and after the last step;
        never with interval 0."""
        return bool(interval) and ((step + 1) % interval == 0 or step + 1 == self.cfg.trainer.num_steps)

    def rollout_metrics(self, samples: list[Sample]) -> dict[str, float]:
        return {**self._sample_metrics(samples, "rollout", "reward"), **self._april_metrics}

    def evaluate(self, step: int) -> dict[str, float]:
        """eval/* metrics for the eval rows under the weights the engines now hold, every eval.interval steps and
        after the last one ({} otherwise)."""
        e = self.cfg.eval
        if not self._due(e.interval, step):
            return {}
        rows = self.eval_rows[:e.max_prompts]
        settings = dataclasses.replace(self.settings, temperature=e.temperature,
                                       max_new_tokens=e.max_new_tokens or self.settings.max_new_tokens)
        samples = generate_groups(self.engines, rows, [render_prompt(self.tokenizer, r) for r in rows],
                                  e.samples_per_prompt, settings)
        score_samples(samples, self.rewards)
        return {**self._sample_metrics(samples, "eval", "eval/reward"), "eval/prompts": float(len(rows))}

    def _sample_metrics(self, samples: list[Sample], prefix: str, reward_prefix: str) -> dict[str, float]:
        metrics = {f"{prefix}/raw_reward": statistics.fmean(s.reward for s in samples),
                   f"{prefix}/response_len/mean": statistics.fmean(s.response_length for s in samples),
                   f"{prefix}/truncated_frac": statistics.fmean(s.status.value == "truncated" for s in samples)}
        for key in sorted({k for s in samples for k in s.reward_components}):
            values = [s.reward_components[key] for s in samples if key in s.reward_components]
            metrics[f"{reward_prefix}/{key}"] = statistics.fmean(values)
        for term in self.cfg.reward.terms():
            batch = reward_batch_metrics_for(term.name, [s.reward_components for s in samples])
            metrics.update({reward_prefix + k[len("reward"):]: v for k, v in batch.items()})
        return metrics

    def log(self, step: int, metrics: dict[str, float]) -> None:
        print(f"step {step + 1}/{self.cfg.trainer.num_steps} reward {metrics['rollout/raw_reward']:.4f} "
              f"pg_loss {metrics['train/pg_loss']:+.4f} grad_norm {metrics['train/grad_norm']:.3f} "
              f"resp_len {metrics['rollout/response_len/mean']:.1f} "
              f"|train-rollout logp| {metrics['train/train_rollout_logprob_abs_diff']:.2e} "
              f"rollout {metrics['perf/rollout_time']:.1f}s train {metrics['perf/train_time']:.1f}s "
              f"sync {metrics['perf/update_weights_time']:.1f}s{_april_summary(metrics)}{_eval_summary(metrics)}",
              flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({**metrics, "train/step": step + 1, "rollout/step": step + 1})

    def save_final(self) -> None:
        path = self.trainer.save_hf_checkpoint(str(self.output_dir / "final"))
        log.info("final HF checkpoint: %s", path)

    def shutdown(self) -> None:
        try:
            self.trainer.shutdown()
            ray.get([e.shutdown.remote() for e in self.engines], timeout=60)
        finally:
            if self.wandb_run is not None:
                self.wandb_run.finish()
            ray.shutdown()


def _eval_summary(metrics: dict[str, float]) -> str:
    if "eval/raw_reward" not in metrics:
        return ""
    return f" | eval reward {metrics['eval/raw_reward']:.4f} ({metrics['eval/prompts']:.0f} prompts)"


def _april_summary(metrics: dict[str, float]) -> str:
    if "rollout/april/groups_resumed" not in metrics:
        return ""
    return (f" | april resumed {metrics['rollout/april/groups_resumed']:.0f} "
            f"aborted {metrics['rollout/april/aborted_samples']:.0f} "
            f"buffered {metrics['rollout/april/buffer/buffered_groups']:.0f}")


def reward_batch_metrics_for(name: str, components: list[dict[str, float]]) -> dict[str, float]:
    """reward/<name>/<metric> from the reward's own batch-metrics function (e.g. factuality's hallucination
    rate), fed the components of that reward only (the runner prefixes them with '<name>/')."""
    fn = reward_batch_metrics(name)
    if fn is None:
        return {}
    prefix = f"{name}/"
    own = [{k[len(prefix):]: v for k, v in c.items() if k.startswith(prefix)} for c in components]
    return {f"reward/{name}/{k}": float(v) for k, v in fn(own).items()}


def _init_wandb(cfg: RunConfig, resume_id: str | None = None):
    if cfg.logging.wandb_mode == "disabled":
        return None
    import wandb

    wandb_dir = resolve_path(cfg.logging.dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    # A resumed run keeps logging into the same W&B run (offline runs sync as one run too).
    run = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name, mode=cfg.logging.wandb_mode,
                     dir=str(wandb_dir), config=dataclasses.asdict(cfg), id=resume_id,
                     resume="allow" if resume_id else None)
    for axis in ("train", "rollout", "reward", "perf", "eval"):
        run.define_metric(f"{axis}/*", step_metric="train/step" if axis in ("train", "perf", "eval")
                          else "rollout/step")
    return run
