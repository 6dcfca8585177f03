"""What the loop in trainer/main.py drives, one call each: the rollout manager (prompts, engines, rewards; a Ray
actor), the Megatron trainer ranks, the weight push between them, run checkpoints and logging."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray

from rollout.data import PromptRow
from rollout.generation import SamplingSettings
from rollout.manager import EnginesJoining, RolloutBatch
from trainer.batching import train_items
from trainer.config import ConfigError, RunConfig, resolve_path
from trainer.console import RunConsole
from trainer.group import TrainerGroup
from trainer.advantages import batch_advantages
from trainer.launch import Launched
from trainer.run_checkpoint import save_checkpoint
from trainer.step_clock import StartupClock, StepClock, split_summary
from trainer.wandb_log import init_wandb, log_step, log_warmup
from trainer.weight_sync.strategies import build_weight_sync

log = logging.getLogger("slipstream")


class Runtime:
    def __init__(self, cfg: RunConfig, rollout, trainer: TrainerGroup, wandb_run, eval_rows: list[PromptRow],
                 resume_from: tuple[Path, dict] | None, stop_token_ids: tuple[int, ...], startup: StartupClock):
        self.cfg, self.rollout, self.trainer, self.wandb_run = cfg, rollout, trainer, wandb_run
        self.eval_rows = _each_task_in_turn(eval_rows)[:cfg.eval.max_prompts]
        self.resume_from, self.stop_token_ids = resume_from, stop_token_ids
        self.output_dir = resolve_path(cfg.output_dir)
        self.engines = ray.get(rollout.engine_handles.remote())
        self.weight_sync = self._build_weight_sync(self.engines)
        self.trace = self.output_dir / "trace" / "batches.jsonl"  # which prompts each step trained
        self.clock = StepClock()  # each step's time split (trainer/step_clock.py)
        self.console: RunConsole | None = None  # progress bars and step lines, from resume() on
        self.startup: StartupClock | None = startup  # logged with the first step, then dropped

    @classmethod
    def start(cls, cfg: RunConfig, launched: Launched) -> "Runtime":
        """The trainer's side of the start (trainer/launch.py did the checks, Ray and the engines): the Megatron
        ranks and W&B while the engines come up, then waits for the engines."""
        startup, saved = launched.startup, launched.resume_from[1] if launched.resume_from else None
        startup.mark("driver_imports")  # trainer/runtime.py and what it imports (torch), the engines starting
        trainer = TrainerGroup(cfg.trainer, str(launched.checkpoint), layer_spec=cfg.model.layer_spec,
                               temperature=cfg.rollout.temperature)
        startup.mark("trainer_ranks")  # the engines start meanwhile
        wandb_run = init_wandb(cfg, resume_id=saved.get("wandb_run_id") if saved else None)  # engines still starting
        startup.mark("wandb")
        try:
            ray.get(launched.rollout.ready.remote())  # engines are up
        except BaseException:
            if wandb_run is not None:
                wandb_run.finish(exit_code=1)
            raise
        startup.mark("engines")  # what is left of their start once the ranks and W&B are up
        if wandb_run is not None and cfg.warmup.steps and saved is None:
            log_warmup(wandb_run, launched.checkpoint)
        return cls(cfg, launched.rollout, trainer, wandb_run, launched.eval_rows, launched.resume_from,
                   launched.stop_token_ids, startup)

    def resume(self) -> int:
        """Restores the newest run checkpoint, if resuming (trainer state, the rollout manager's prompts, groups
        and partials; pushes the restored weights), then starts generation. Returns the step to continue from."""
        start = 0
        if self.resume_from is not None:
            path, state = self.resume_from
            try:
                self.trainer.load_state(str(path / "trainer"))
            except ray.exceptions.RayTaskError as exc:  # e.g. saved with another layout: the rank names the fields
                raise ConfigError(f"trainer: cannot resume from {path}: {getattr(exc, 'cause', exc)}") from exc
            ray.get(self.rollout.load_state.remote(state["rollout"]))
            self.weight_sync.push(state["weight_version"])
            ray.get(self.rollout.on_weights.remote(state["weight_version"]))
            start = state["next_step"]
            self._truncate_trace(start)
        self.console = RunConsole(self.cfg.trainer.num_steps, first_step=start).__enter__()
        if self.resume_from is not None:
            self.console.print(f"resumed from {self.resume_from[0]} at step {start + 1}")
        elif self.cfg.eval.at_start and self.cfg.eval.interval:
            metrics = self._run_eval()
            self.console.print(f"start{_eval_summary(metrics)}{_task_summary(metrics, 'eval')}")
            self._record({"step": 0, **metrics})
            if self.wandb_run is not None:
                self.wandb_run.log({**metrics, "eval/step": 0})
        ray.get(self.rollout.start.remote())
        self.startup.mark("resume")  # a run checkpoint restored and pushed, the evaluation before RL, if any
        return start

    def next_batch(self, step: int) -> RolloutBatch:
        """The batch of `step`. While the engine pool holds replacements for failed engines, they first get the
        trainer's current weights (policy version `step`) and join."""
        self.clock.start()
        while True:
            with self.console.stage("rollout", total=self.cfg.rollout.prompts_per_step):
                out = self._wait_with_progress(self.rollout.next_batch.remote(step))
            if not isinstance(out, EnginesJoining):
                score = out.metrics["rollout/score_wait_time"]
                self.clock.add("generation", out.metrics["rollout/wait_time"] - score)
                self.clock.add("scoring", score)
                return out
            t0 = time.perf_counter()
            sync = self._build_weight_sync(out.handles)
            try:
                sync.push(step)
            finally:
                sync.close()
            self.clock.add("weight_sync", time.perf_counter() - t0)
            ray.get(self.rollout.on_engines_joined.remote(out.handles))
            log.info("%d replacement engine(s) joined at version %d", len(out.handles), step)

    def _wait_with_progress(self, ref):
        """ray.get(ref); on a terminal, the rollout bar follows the groups ready for the batch meanwhile."""
        if not self.console.live:
            return ray.get(ref)
        while not ray.wait([ref], timeout=0.25)[0]:
            flow = ray.get(self.rollout.metrics.remote())
            self.console.update(int(min(flow["rollout/flow/ready_groups"], self.cfg.rollout.prompts_per_step)))
        return ray.get(ref)

    def _build_weight_sync(self, engines: list):
        return build_weight_sync(self.cfg.trainer, self.trainer, engines, engine_dtype=self.cfg.model.dtype,
                                 weights_dir=self.output_dir / "weights")

    def _refresh_engines(self) -> None:
        """Rebuilds the weight push when the pool's engines changed (one failed, a replacement joined)."""
        engines = ray.get(self.rollout.engine_handles.remote())
        if [e._actor_id for e in engines] == [e._actor_id for e in self.engines]:
            return
        try:
            self.weight_sync.close()
        except ray.exceptions.RayActorError:  # the old set held an engine that is gone
            pass
        self.engines, self.weight_sync = engines, self._build_weight_sync(engines)

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """GRPO advantages within each group (turn-level for agent episodes, trainer.turn_advantage), then the
        trainer's optimizer step(s) at policy version batch.step."""
        samples = batch.samples
        t = self.cfg.trainer
        advantages = batch_advantages(samples, self.cfg.rollout.samples_per_prompt, t.turn_advantage,
                                      t.advantage_eps)
        items = train_items(samples, advantages, batch.step, self._max_token_age())
        with self.console.stage("train"):
            metrics = self.trainer.train_step(items, train_version=batch.step)
        self.clock.add("training", metrics["perf/train_compute_time"])
        self._trace(batch)
        flat = [abs(a) for adv in advantages for a in (adv if isinstance(adv, list) else [adv])]
        return {**batch.metrics, **metrics, "train/advantage_abs_mean": sum(flat) / max(len(flat), 1)}

    def _max_token_age(self) -> int | None:
        limits = [self.cfg.trainer.max_token_age,
                  self.cfg.rollout.max_staleness if self.cfg.rollout.stale_policy == "mask" else None]
        limits = [x for x in limits if x is not None]
        return min(limits) if limits else None

    def sync_weights(self, step: int) -> dict[str, float]:
        """After train step `step`, every loop.sync_interval steps: the engines get policy version step + 1 while
        the rollout manager holds their in-flight requests (drained, paused or aborted, by loop mode)."""
        version = step + 1
        if version % self.cfg.loop.sync_interval and version != self.cfg.trainer.num_steps:
            return {}
        t0 = time.perf_counter()
        with self.console.stage("drain"):
            ray.get(self.rollout.pause_for_weights.remote())  # sync/one_step_off: in-flight generation finishes
        t1 = time.perf_counter()
        self.clock.add("generation", t1 - t0)
        self._refresh_engines()
        with self.console.stage("sync"):
            try:
                metrics = self.weight_sync.push(version)  # trainer/weight_sync: bucketed, from the owning ranks
            except ray.exceptions.RayActorError:  # an engine died under the push: once the pool replaced it
                self._wait_for_engine_change()
                metrics = self.weight_sync.push(version)
        self.clock.add("weight_sync", time.perf_counter() - t1)
        ray.get(self.rollout.on_weights.remote(version))
        return {**metrics, "perf/weight_version": float(version)}

    def _wait_for_engine_change(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or 2 * self.cfg.rollout.health_timeout_s)
        before = [e._actor_id for e in self.engines]
        while time.monotonic() < deadline:
            self._refresh_engines()
            if [e._actor_id for e in self.engines] != before:
                return
            time.sleep(0.5)
        raise RuntimeError("a weight push failed on an engine the pool did not replace")

    def evaluate(self, step: int) -> dict[str, float]:
        """eval/* metrics for the eval rows under the weights the engines now hold, every eval.interval steps and
        after the last one ({} otherwise)."""
        if not self._due(self.cfg.eval.interval, step):
            return {}
        t0 = time.perf_counter()
        with self.console.stage("eval"):
            metrics = self._run_eval()
        self.clock.add("eval", time.perf_counter() - t0)
        return metrics

    def _run_eval(self) -> dict[str, float]:
        e = self.cfg.eval
        settings = SamplingSettings(e.max_new_tokens or self.cfg.rollout.max_new_tokens, e.temperature,
                                    self.cfg.rollout.top_p, self.stop_token_ids)
        return ray.get(self.rollout.evaluate.remote(self.eval_rows, settings, e.samples_per_prompt))

    def save_checkpoint(self, step: int) -> None:
        """A run checkpoint after `step` (0-based) every checkpoint.save_interval steps and after the last one."""
        if not self._due(self.cfg.checkpoint.save_interval, step):
            return
        run_state = {"weight_version": step + 1, "rollout": ray.get(self.rollout.state.remote()),
                     "wandb_run_id": self.wandb_run.id if self.wandb_run is not None else None}
        path = save_checkpoint(self.output_dir, step + 1, run_state, lambda d: self.trainer.save_state(str(d)),
                               self.cfg.checkpoint.keep_last)
        log.info("run checkpoint: %s", path)

    def _due(self, interval: int, step: int) -> bool:
        """Whether a periodic stage runs after `step` (0-based): every `interval` steps and after the last step;
        never with interval 0."""
        return bool(interval) and ((step + 1) % interval == 0 or step + 1 == self.cfg.trainer.num_steps)

    def _trace(self, batch: RolloutBatch) -> None:
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        groups = [{"group": g[0].group_id, "row": g[0].metadata.get("row"), "epoch": g[0].metadata.get("epoch")}
                  for g in batch.groups]
        with self.trace.open("a") as f:
            f.write(json.dumps({"step": batch.step, "time": time.time(), "groups": groups}) + "\n")

    def _record(self, metrics: dict[str, float]) -> None:
        """Appends one line of metrics (step 0: the evaluation before RL) to metrics.jsonl, which benchmarks read."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def _truncate_trace(self, next_step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: their lines go (batch trace and metrics)."""
        # The trace counts steps from 0, metrics.jsonl from 1 (0: the evaluation before RL).
        for path, keep in ((self.trace, lambda s: s < next_step),
                           (self.output_dir / "metrics.jsonl", lambda s: s <= next_step)):
            if path.is_file():
                lines = [ln for ln in path.read_text().splitlines() if keep(json.loads(ln)["step"])]
                path.write_text("".join(ln + "\n" for ln in lines))

    def log(self, batch: RolloutBatch, metrics: dict[str, float]) -> None:
        """The step line on the console, the step's metrics in <output_dir>/metrics.jsonl, and W&B."""
        step = batch.step
        metrics.update(self.clock.close())
        if self.startup is not None:
            metrics.update(self.startup.metrics())
            self.startup = None
        m = metrics
        self._record({"step": step + 1, **m})
        self.console.print(f"step {step + 1}/{self.cfg.trainer.num_steps} reward {m['rollout/raw_reward']:.4f} "
              f"pg_loss {m['train/pg_loss']:+.4f} grad_norm {m['train/grad_norm']:.3f} "
              f"resp_len {m['rollout/response_len/mean']:.1f} "
              f"|train-rollout logp| {m['train/train_rollout_logprob_abs_diff_current']:.2e} "
              f"stale {m['rollout/staleness/max']:.0f} "
              f"{split_summary(m)}{_partial_summary(m)}{_agent_summary(m)}{_eval_summary(m)}"
              f"{_task_summary(m, 'eval')}")
        self.console.step_done()
        if self.wandb_run is not None:
            # The advantages again (cheap: a few numbers per sample) for their histogram, rather than keeping them
            # on the side between train() and log().
            t = self.cfg.trainer
            advantages = batch_advantages(batch.samples, self.cfg.rollout.samples_per_prompt, t.turn_advantage,
                                          t.advantage_eps)
            log_step(self.wandb_run, self.cfg, batch, metrics, advantages)

    def save_final(self) -> None:
        path = self.trainer.save_hf_checkpoint(str(self.output_dir / "final"))
        log.info("final HF checkpoint: %s", path)

    def shutdown(self) -> None:
        if self.console is not None:
            self.console.__exit__(None, None, None)
        try:
            self.weight_sync.close()
            self.trainer.shutdown()
            ray.get(self.rollout.shutdown.remote(), timeout=180)
        finally:
            if self.wandb_run is not None:
                self.wandb_run.finish()
            ray.shutdown()


def _each_task_in_turn(rows: list[PromptRow]) -> list[PromptRow]:
    """Rows reordered to take one of each task family in turn (in each family's own order), so that the first N
    rows cover every family."""
    by_task: dict[str | None, list[PromptRow]] = {}
    for row in rows:
        by_task.setdefault(row.task, []).append(row)
    queues = list(by_task.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _task_summary(m: dict[str, float], prefix: str) -> str:
    """Per-task-family reward (and factuality's hallucination rate) for the console, when there are families."""
    tasks = sorted(k[len(prefix) + 1:-len("/raw_reward")] for k in m
                   if k.startswith(prefix + "/") and k.endswith("/raw_reward") and k.count("/") == 2)
    parts = [f"{t} {m[f'{prefix}/{t}/raw_reward']:+.2f}" for t in tasks]
    parts += [f"{t} halluc {m[f'{prefix}/{t}/hallucination_rate']:.2f}" for t in tasks
              if f"{prefix}/{t}/hallucination_rate" in m]
    return f" [{', '.join(parts)}]" if parts else ""


def _eval_summary(metrics: dict[str, float]) -> str:
    if "eval/raw_reward" not in metrics:
        return ""
    return f" | eval reward {metrics['eval/raw_reward']:.4f} ({metrics['eval/prompts']:.0f} prompts)"


def _agent_summary(m: dict[str, float]) -> str:
    """Agent episodes of the batch (rewards.envs.episode_metrics), when it has any."""
    if "agent/episodes" not in m:
        return ""
    calls = m["agent/tool_calls/per_episode"]
    ok = f" ok {m['agent/tool_call_success_rate']:.2f}" if "agent/tool_call_success_rate" in m else ""
    return f" | episodes {m['agent/episodes']:.0f} turns {m['agent/turns/mean']:.1f} tool calls {calls:.1f}{ok}"


def _partial_summary(m: dict[str, float]) -> str:
    """Partial-rollout counters, when there is anything to say."""
    resumed, partial = m.get("rollout/flow/total_resumed_requests", 0.0), m.get("rollout/flow/partial_samples", 0.0)
    if not resumed and not partial:
        return ""
    return (f" | resumed {resumed:.0f} aborted {m.get('rollout/flow/total_aborted_requests', 0.0):.0f} "
            f"partial {partial:.0f} live {m.get('rollout/flow/live_groups', 0.0):.0f}")
