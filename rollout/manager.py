"""The rollout manager: a Ray actor that owns the prompt source and rendering, group ids, partial rollouts, the
engines and the reward runner, and hands the loop typed batches.

    manager.start()                      # generation begins (in the background, as the loop mode allows)
    batch = manager.next_batch(step)     # a RolloutBatch: scored groups, per-token logprobs and versions, metrics
    manager.pause_for_weights()          # stop dispatching; drain, pause or abort what runs (loop.mode/pause_mode)
    ...push weights into manager.engines()...
    manager.on_weights(version)          # resume
    manager.evaluate(...) / state() / load_state(...)

One dispatcher serves every mode: the plain path is the APRIL path with over-sampling 0. Its bookkeeping (admission,
staleness, batch order, dynamic sampling) is `rollout.flow.RolloutFlow`; this class adds the threads, engines and
rewards. Two threads run beside the actor's calls: `dispatch` keeps admitting groups (as the capacity rule allows),
sends their samples to the engines (a group's samples to one engine, for its prefix cache) and applies results as
each request finishes; `score` scores each group as soon as all its samples are done.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray

from rewards import RewardRunner, RewardSpec, RunnerSettings
from rewards.envs import EnvSettings, episode_metrics
from rollout.agent import ModelTurn
from rollout.agent.driver import AgentDriver, EnvAnswer, episode_components
from rollout.config import LoopConfig, RolloutConfig, flow_settings
from rollout.data import DataExhausted, PromptRow, make_source, render_prompt
from rollout.data.config import DataConfig
from rollout.engine_pool import EnginePool, PoolSettings
from rollout.flow import RolloutFlow
from rollout.generation import SamplingSettings, make_group, score_samples
from rollout.metrics import duplicate_response_frac, sample_metrics, staleness_metrics, token_ages
from rollout.protocol import EngineRequest
from rollout.sample import Sample

log = logging.getLogger(__name__)
STATE_FORMAT = 1


@dataclass(frozen=True)
class EngineSpec:
    model_path: str
    count: int = 1
    dtype: str = "float32"
    max_total_tokens: int = 16384
    seed: int = 0
    start_timeout_s: float = 300.0
    cpus: float = 1.0


@dataclass(frozen=True)
class EnginesJoining:
    """What next_batch returns instead of a batch while replacement engines wait for weights: the loop pushes
    its current weights to `handles`, calls on_engines_joined(handles), and asks again."""

    handles: list


@dataclass(frozen=True)
class RolloutBatch:
    """One training batch: `groups` of scored samples (group after group, each a whole group), the policy version
    it trains at (`step`), the age of its tokens, and rollout metrics."""

    step: int
    groups: list[list[Sample]]
    metrics: dict[str, float] = field(default_factory=dict)
    token_ages: dict[int, int] = field(default_factory=dict)  # versions old at `step` -> response tokens

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g]


class RolloutManager:
    DISPATCH_POLL_S = 0.05  # how long the dispatch loop waits for results before it looks for new work

    def __init__(self, rollout: RolloutConfig, loop: LoopConfig, data: DataConfig, rows: list[PromptRow],
                 engines: EngineSpec, rewards: list[RewardSpec], reward_settings: RunnerSettings,
                 engine_handles: list | None = None, engine_factory=None,
                 task_rewards: dict[str, list[RewardSpec]] | None = None):
        """`rewards` score single-turn rows, except rows whose task has its own in `task_rewards`.
        `engine_handles`/`engine_factory`: engines started elsewhere (start_engines) and how to start a replacement;
        by default the manager starts `engines.count` SGLang engines and replaces failed ones itself."""
        from glm5_model.tokenizer import load_tokenizer
        from glm5_model.tokenizer.build import stop_token_ids

        self.cfg, self.loop_cfg = rollout, loop
        self.tokenizer = load_tokenizer(engines.model_path)
        self.sampling = SamplingSettings(rollout.max_new_tokens, rollout.temperature, rollout.top_p,
                                         tuple(stop_token_ids(self.tokenizer)))
        self.data = make_source(data, rows)
        self.flow = RolloutFlow(flow_settings(rollout, loop),
                                decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        self.rewards = RewardRunner(rewards, reward_settings)
        self.task_rewards = {task: RewardRunner(specs, reward_settings) for task, specs in (task_rewards or {}).items()}
        self.reward_names = {None: [r.name for r in rewards],
                             **{task: [r.name for r in specs] for task, specs in (task_rewards or {}).items()}}
        if engine_handles is None:
            handles = start_engines(engines)
            engine_factory = engine_factory or functools.partial(start_engine, engines)
        else:
            handles = engine_handles
        self.pool = EnginePool(handles, PoolSettings(rollout.health_interval_s, rollout.health_timeout_s,
                                                     rollout.max_engine_restarts), engine_factory)
        self._cond = threading.Condition()  # guards self.flow and the fields below
        self._submit_lock = threading.Lock()  # held while a dispatch is being handed to the engines
        self._to_score: queue.Queue[int | None] = queue.Queue()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._paused_engines = False
        self._last_batch_t = time.monotonic()
        self._reward_totals: dict[str, int] = {}
        self._generated_at: dict[int, float] = {}  # group id -> when its generation finished (queued for scoring)
        a = rollout.agent
        self.agents = AgentDriver(self.tokenizer, EnvSettings(a.step_timeout_s, a.episode_timeout_s, a.max_turns,
                                                              a.max_tokens, a.on_env_error), a.env_kwargs,
                                  self._on_env_answer, self._set_error)
        self.server = None
        if rollout.openai_port is not None:
            import os

            from rollout.openai_server import OpenAIServer

            key = os.environ.get(rollout.openai_api_key_env) if rollout.openai_api_key_env else None
            self.server = OpenAIServer(self.pool, self.tokenizer, os.path.basename(engines.model_path.rstrip("/")),
                                       self.sampling.stop_token_ids, rollout.openai_host, rollout.openai_port, key,
                                       rollout.max_new_tokens)

    def ready(self) -> int:
        """Waits for every engine to be up; returns their weight version."""
        return max(ray.get([e.weight_version.remote() for e in self.pool.serving_handles()]))

    def engine_handles(self) -> list:
        """The engines a weight push must reach (serving ones, and replacements waiting for weights)."""
        return self.pool.serving_handles()

    def start(self) -> None:
        """Starts generation. Call after load_state when resuming."""
        if self._threads:
            return
        for name, target in (("dispatch", self._dispatch_loop), ("score", self._score_loop)):
            t = threading.Thread(target=self._guard(target), name=f"rollout-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    # ------------------------------------------------------------------ the loop's calls
    def next_batch(self, step: int) -> RolloutBatch | EnginesJoining:
        """The batch that trains at policy version `step` (the trainer after `step` optimizer steps), waiting for
        it as long as needed (up to loop.batch_timeout_s); or, while replacement engines wait for weights,
        EnginesJoining (the loop pushes them its weights and asks again)."""
        t0 = time.monotonic()
        deadline = t0 + self.loop_cfg.batch_timeout_s
        with self._cond:
            if step != self.flow.batches_taken:
                raise ValueError(f"next_batch({step}): the next batch trains at step {self.flow.batches_taken}")
            while True:
                self._raise_if_failed()
                batch = self.flow.take_batch()
                if batch is not None:
                    break
                joining = self.pool.joining()
                if joining:
                    return EnginesJoining(joining)
                if self.data.exhausted and len(self.flow.groups) < self.cfg.prompts_per_step:
                    raise DataExhausted(f"the data is exhausted and only {len(self.flow.groups)} prompt groups are "
                                        f"left, fewer than a batch ({self.cfg.prompts_per_step})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no batch for step {step} within {self.loop_cfg.batch_timeout_s:.0f}s "
                                       f"({self._describe()})")
                self._cond.wait(0.5)
            stragglers = self.flow.stragglers()
            if self.loop_cfg.mode == "sync":
                # Nothing more runs on these weights: stragglers resume under the next version (APRIL).
                self.flow.paused = True
            # Scoring on the critical path: from when the batch's last group finished generating (or when the
            # wait began, if later) until the batch was complete; the rest of the wait was generation.
            generated = max((self._generated_at.pop(g[0].group_id, t0) for g in batch), default=t0)
            score_wait = max(0.0, time.monotonic() - max(t0, generated))
            for gid in [gid for gid in self._generated_at if gid not in self.flow.groups]:  # dropped groups
                del self._generated_at[gid]
            for g in batch:
                self.pool.forget(g[0].group_id)
            metrics = self._batch_metrics(batch, step)
            keys = [s.key for g in batch for s in g if s.multi_turn]
            if keys:
                metrics.update(episode_metrics([self.agents.result(k) for k in keys], prefix="agent"))
                self.agents.forget(keys)
            self._cond.notify_all()  # capacity may have opened
        if stragglers:  # APRIL: the batch is complete; what still runs is aborted and resumed next step
            self._abort_engines()
        ages = token_ages([s for g in batch for s in g], step)
        metrics.update(staleness_metrics(ages))
        metrics["rollout/wait_time"] = time.monotonic() - t0
        metrics["rollout/score_wait_time"] = min(score_wait, metrics["rollout/wait_time"])
        return RolloutBatch(step, batch, metrics, dict(ages))

    def pause_for_weights(self) -> None:
        """Stops admission and dispatch, then: waits for in-flight requests (sync, one_step_off), pauses the
        engines with them inside (async, pause_mode in_place/retract), or aborts them (pause_mode abort)."""
        with self._cond:
            self.flow.paused = True
        with self._submit_lock:  # a dispatch already taken from the flow reaches its engine first
            pass
        mode = self.loop_cfg.mode
        if mode != "async":
            self._wait_until(lambda: not self.flow.in_flight)
        elif self.loop_cfg.pause_mode == "abort":
            self._abort_engines()
        else:
            self.pool.pause(self.loop_cfg.pause_mode)
            self._paused_engines = True

    def on_weights(self, version: int) -> None:
        """Every engine of engine_handles() now serves `version`: resume them and continue generating."""
        if self._paused_engines:
            self.pool.resume()
            self._paused_engines = False
        self.pool.on_weights(version=version)
        with self._cond:
            self.flow.on_weights(version)
            self.flow.paused = False
            self._cond.notify_all()
        if self._threads:  # the groups the new version admits go out now, not at the dispatch loop's next poll
            self._dispatch()

    def on_engines_joined(self, handles: list) -> None:
        """Replacement engines got the loop's current weights (after EnginesJoining): they serve from now on."""
        self.pool.on_weights(handles)

    def evaluate(self, rows: list[PromptRow], settings: SamplingSettings, samples_per_prompt: int = 1
                 ) -> dict[str, float]:
        """eval/* metrics: `rows` generated for with `settings` on the engines as they are now, scored with the
        run's rewards; agent rows run as whole episodes of their environments (each turn's budget is what the
        episode has left, rollout.agent.max_tokens, as in training), with eval/agent/* episode metrics. Runs
        beside background generation; not part of any batch."""
        groups = [make_group(row, render_prompt(self.tokenizer, row), -1 - i, samples_per_prompt)
                  for i, row in enumerate(rows)]
        samples = [s for g in groups for s in g]
        plain = [s for s in samples if not s.multi_turn]
        episodes = [s for s in samples if s.multi_turn]
        requests = [EngineRequest(f"eval/{time.monotonic_ns()}/{s.metadata['row']}/{s.index_in_group}", s.prompt_ids,
                                  settings.as_sglang()) for s in plain]
        for s, res in zip(plain, self.pool.generate(requests) if requests else []):
            s.append_response(res.output_ids, res.output_logprobs, res.output_versions)
            s.response_text = res.text
        for task in {s.metadata.get("task") for s in plain}:
            own = [s for s in plain if s.metadata.get("task") == task]
            for s, (score, components) in zip(own, score_samples(own, self._rewards_for(task))):
                s.reward, s.reward_components = score, components
        metrics = {"eval/prompts": float(len(rows))}
        if episodes:
            results = self.agents.run_whole(episodes, self._eval_turn(settings))
            metrics.update(episode_metrics(results, prefix="eval/agent"))
        return {**sample_metrics(samples, "eval", "eval/reward", self.reward_names), **metrics}

    def _eval_turn(self, settings: SamplingSettings):
        """One model turn of an evaluation episode: a blocking pool.generate in a worker thread."""
        async def generate(ids: list[int], budget: int) -> ModelTurn:
            # The turn's budget is what the episode has left (rollout.agent.max_tokens), as in training.
            request = EngineRequest(f"eval/episode/{uuid.uuid4().hex}", ids, settings.as_sglang(budget))
            (res,) = await asyncio.to_thread(self.pool.generate, [request])
            return ModelTurn(res.output_ids, res.output_logprobs, res.output_versions, res.finish_reason == "stop")
        return generate

    def state(self) -> dict:
        """Everything needed to continue exactly: the data cursor and every live group (finished and waiting to
        be trained, or partial with its tokens, logprobs and versions). Requests in flight are aborted first
        (their tokens kept) and resumed right after. Call between weight pushes, not inside one."""
        with self._cond:
            self.flow.paused = True
            self.flow.keep_aborted_tokens = True
        try:
            with self._submit_lock:
                pass
            self._abort_engines()
            self._wait_until(lambda: self._to_score.unfinished_tasks == 0)
            with self._cond:
                return {"format": STATE_FORMAT, "flow": self.flow.state_dict(), "data": self.data.state()}
        finally:
            with self._cond:
                self.flow.keep_aborted_tokens = False
                self.flow.paused = False
                self._cond.notify_all()

    def load_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"rollout manager state has format {state.get('format')!r}, expected {STATE_FORMAT}")
        if self._threads:
            raise RuntimeError("load_state after start()")
        self.data.load_state(state["data"])
        self.flow.load_state_dict(state["flow"])
        for gid, group in self.flow.groups.items():  # finished before the checkpoint but not scored yet
            if gid not in self.flow.ready and all(s.finished for s in group):
                self._queue_for_scoring(gid)

    def metrics(self) -> dict[str, float]:
        with self._cond:
            return {f"rollout/flow/{k}": v for k, v in self.flow.metrics().items()}

    def pool_metrics(self) -> dict[str, float]:
        return self.pool.metrics()

    def openai_url(self) -> str | None:
        """The OpenAI-compatible endpoint's base URL (rollout.openai_port), or None when it is off."""
        return self.server.url if self.server is not None else None

    def shutdown(self) -> None:
        self._stop.set()
        self._to_score.put(None)
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)
        if self.server is not None:
            self.server.stop()
        self.agents.close()
        self.pool.shutdown()

    # ------------------------------------------------------------------ background threads
    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._dispatch()
            results = self.pool.collect(self.DISPATCH_POLL_S)
            with self._cond:
                for res in results:
                    gid = self.flow.on_result(res)
                    if gid is not None:
                        self._queue_for_scoring(gid)
                env_work = self.flow.take_env_work()
                if results:
                    self._cond.notify_all()
            for sample, ended in env_work:  # multi-turn samples: their environments answer in the background
                self.agents.submit(sample, ended)

    def _on_env_answer(self, sample: Sample, answer: EnvAnswer) -> None:
        with self._cond:
            gid = self.flow.on_env(sample, answer.observation_ids, answer.done, answer.prompt_ids,
                                   answer.tokens_left)
            if gid is not None:
                self._queue_for_scoring(gid)
            self._cond.notify_all()

    def _set_error(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def _queue_for_scoring(self, gid: int) -> None:
        """Group `gid` has finished generating (called under self._cond, or before start())."""
        self._generated_at[gid] = time.monotonic()
        self._to_score.put(gid)

    def _score_loop(self) -> None:
        while True:
            gid = self._to_score.get()
            try:
                if gid is None:
                    return
                with self._cond:
                    group = list(self.flow.groups.get(gid, []))
                if group:
                    scores = self._episode_scores(group) if group[0].multi_turn else \
                        score_samples(group, self._rewards_for(group[0].metadata.get("task")))
                    with self._cond:
                        if gid in self.flow.groups:
                            if not self.flow.on_scored(gid, scores):
                                self._generated_at.pop(gid, None)
                                self.pool.forget(gid)
                                self.agents.forget([s.key for s in group])
                            self._cond.notify_all()
            finally:
                self._to_score.task_done()

    def _episode_scores(self, group: list[Sample]) -> list[tuple[float, dict[str, float]]]:
        """A multi-turn group's rewards: each episode's outcome (its environment's verdict)."""
        results = [self.agents.result(s.key) for s in group]
        for s, r in zip(group, results):
            if r is None:
                raise RuntimeError(f"sample {s.key}: its episode finished without a result")
        return [(r.reward, episode_components(r)) for r in results]

    def _rewards_for(self, task: str | None) -> RewardRunner:
        """The reward runner of a row's task: its own (reward.by_task, a task family's) or the run's."""
        return self.task_rewards.get(task, self.rewards) if task is not None else self.rewards

    def _dispatch(self) -> None:
        """Admits fresh groups up to the capacity rule and hands every sample with generation left to the engines
        (the dispatch loop, and on_weights, whose version opens capacity while the engines sit idle)."""
        with self._submit_lock:
            with self._cond:
                self._admit()
                work = [(d.group_id, EngineRequest(d.rid, d.input_ids, self.sampling.as_sglang(d.max_new_tokens)))
                        for d in self.flow.dispatch()]
            if work:
                self.pool.submit(work)

    def _admit(self) -> None:
        """Fresh groups up to the capacity rule (called under self._cond)."""
        for _ in range(self.flow.capacity()):
            if self.data.exhausted:
                return
            (row,) = self.data.next_batch(1)
            self.flow.admit(self._new_group(row, self.flow.admitted))

    def _new_group(self, row: PromptRow, group_id: int) -> list[Sample]:
        """The unanswered samples of one prompt (a subclass may give each its own budget, e.g. in benchmarks)."""
        return make_group(row, render_prompt(self.tokenizer, row), group_id, self.cfg.samples_per_prompt,
                          epoch=self.data.epoch)

    # ------------------------------------------------------------------ helpers
    def _abort_engines(self) -> None:
        """Aborts everything the engines run and waits until each result is back in the flow."""
        self.pool.abort_all()
        self._wait_until(lambda: not self.flow.in_flight)

    def _wait_until(self, predicate, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                self._raise_if_failed()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout manager: still waiting after {timeout_s:.0f}s ({self._describe()})")
                self._cond.wait(0.1)

    def _batch_metrics(self, batch: list[list[Sample]], step: int) -> dict[str, float]:
        samples = [s for g in batch for s in g]
        now = time.monotonic()
        pool = self.pool.metrics()
        span = max(now - self._last_batch_t, 1e-9)
        idle = pool.pop("rollout/pool/_idle_engine_s") / (span * max(pool["rollout/pool/active_engines"], 1.0))
        self._last_batch_t = now
        return {**sample_metrics(samples, "rollout", "reward", self.reward_names),
                **{f"rollout/flow/{k}": v for k, v in self.flow.metrics().items()}, **pool,
                "rollout/engine_idle_frac": min(1.0, idle), "rollout/engine_version": float(self.flow.version),
                "rollout/groups": float(len(batch)), "rollout/duplicate_response_frac": duplicate_response_frac(batch),
                **self._reward_call_counts()}

    def _reward_call_counts(self) -> dict[str, float]:
        """Reward functions run, and results taken from the reward cache (reward.cache_size), since the last batch,
        over every reward runner (evaluations' calls included)."""
        totals = {k: sum(r.stats[k] for r in (self.rewards, *self.task_rewards.values()))
                  for k in ("calls", "cache_hits")}
        delta = {k: v - self._reward_totals.get(k, 0) for k, v in totals.items()}
        self._reward_totals = totals
        return {"rollout/reward_calls": float(delta["calls"]), "rollout/reward_cache_hits": float(delta["cache_hits"])}

    def _describe(self) -> str:
        m = self.flow.metrics()
        text = (f"{m['live_groups']:.0f} live groups, {m['ready_groups']:.0f} ready, "
                f"{m['in_flight_requests']:.0f} requests in flight, version {self.flow.version}, "
                f"paused {self.flow.paused}")
        if self.flow.groups:  # what a batch in admission order waits on
            gid, group = next(iter(self.flow.groups.items()))
            busy = set(self.flow.in_flight.values())
            state = "scored" if gid in self.flow.ready else ", ".join(
                s.status.value + (" in flight" if (gid, s.index_in_group) in busy else "") for s in group)
            text += f"; oldest live group {gid}: {state}"
        return text

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"rollout manager failed: {self._error!r}") from self._error

    def _guard(self, target):
        def run():
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - surfaced to the loop by next_batch / pause
                log.exception("rollout manager thread %s failed", threading.current_thread().name)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
        return run


def start_engines(spec: EngineSpec) -> list:
    """Starts `spec.count` SGLang engine actors; returns their handles at once (each comes up on its own)."""
    return [start_engine(spec, i) for i in range(spec.count)]


def start_engine(spec: EngineSpec, i: int):
    """The i-th engine started for `spec` (replacements continue the count; i also offsets the seed)."""
    from rollout.engine import RolloutEngineActor

    return RolloutEngineActor.options(num_cpus=spec.cpus).remote(
        spec.model_path, dtype=spec.dtype, max_total_tokens=spec.max_total_tokens, seed=spec.seed + i,
        start_timeout_s=spec.start_timeout_s)


# Threaded: next_batch waits in one thread while the dispatch and score threads run and pause/on_weights/state
# arrive. Its own work is light; the engines and reward workers do the heavy part.
RolloutManagerActor = ray.remote(max_concurrency=8)(RolloutManager)
