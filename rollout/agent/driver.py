"""The rollout manager's side of agent episodes: each multi-turn sample's environment (rewards/envs) runs on an
asyncio loop of its own, so a slow environment (a sandbox running tests) never holds up generation.

The manager's flow says when a sample waits for its environment (rollout/flow.py: status ENV): `submit(sample,
ended)` resets the episode (`ended` None) or hands it the model's turn -- the tokens the sample generated since
the turn began, however many aborted pieces it took -- and `on_answer(sample, EnvAnswer)` gets back the prompt
(after a reset) or the observation's tokens, whether the episode is over, and the next turn's budget. The
episode's own token sequence (rollout/agent/sequence.py) must equal the sample's response, token for token and
mask for mask; a difference is an error, not a silent fix."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewards.envs import EnvSettings
from rewards.envs.api import Task
from rewards.envs.runner import EnvRunner, EpisodeResult
from rollout.agent.episode import AgentEpisode, Generate, run_episode
from rollout.sample import Sample, SampleStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnvAnswer:
    observation_ids: list[int]
    done: bool
    prompt_ids: list[int] | None = None  # after a reset
    tokens_left: int | None = None       # the next turn's budget


def task_of(sample: Sample) -> tuple[str, Task]:
    """The environment name and task a multi-turn sample's label carries ({"env": name, "task": {...}})."""
    return label_task(sample.label, sample.prompt, f"sample {sample.key} (row {sample.metadata.get('row')})")


def label_task(label: Any, prompt: Any, where: str) -> tuple[str, Task]:
    """The environment name and task of an agent row's label; `where` names the row or sample in errors."""
    label = label if isinstance(label, dict) else {}
    if "env" not in label or not isinstance(label.get("task"), dict):
        raise ValueError(f"{where}: a multi-turn sample's label must be {{'env': <environment>, 'task': "
                         "{'id', 'prompt', 'tools', 'data'}}")
    t = label["task"]
    return label["env"], Task(id=str(t["id"]), prompt=list(t.get("prompt") or prompt or []),
                              tools=list(t.get("tools") or []), data=dict(t.get("data") or {}),
                              split=str(t.get("split", "train")))


class AgentDriver:
    def __init__(self, tokenizer: Any, settings: EnvSettings, env_kwargs: dict[str, Any] | None,
                 on_answer: Callable[[Sample, EnvAnswer], None], on_error: Callable[[BaseException], None]):
        self.tokenizer, self.settings, self.env_kwargs = tokenizer, settings, dict(env_kwargs or {})
        self.on_answer, self.on_error = on_answer, on_error
        self._runners: dict[str, EnvRunner] = {}
        self._episodes: dict[str, tuple[AgentEpisode, int]] = {}  # sample key -> (episode, response index of turn)
        self._results: dict[str, EpisodeResult] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="agent-envs", daemon=True)
        self._thread.start()

    def submit(self, sample: Sample, ended: SampleStatus | None) -> None:
        """Resets the sample's episode (ended None) or answers its finished turn, in the background."""
        work = self._reset(sample) if ended is None else self._step(sample, ended)
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        future.add_done_callback(self._report)

    def run_whole(self, samples: list[Sample], generate: Generate) -> list[EpisodeResult]:
        """Whole episodes for `samples` outside the rollout flow (evaluation), all at once on the environments'
        loop, each turn from `generate`; fills each sample's response, mask and reward and returns the results.
        An episode whose reset failed keeps an empty response and the fallback score."""
        async def one(s: Sample) -> EpisodeResult:
            name, task = task_of(s)
            out = await run_episode(self._runner(name), task, self.tokenizer, generate)
            seq = out.sequence
            if seq.prompt_ids:
                s.prompt_ids = list(seq.prompt_ids)
            s.response_ids, s.response_mask = list(seq.response_ids), list(seq.loss_mask)
            s.response_logprobs, s.response_versions = list(seq.response_logprobs), list(seq.response_versions)
            s.response_text = self.tokenizer.decode([t for t, m in zip(seq.response_ids, seq.loss_mask) if m],
                                                    skip_special_tokens=True)
            s.status, s.reward = SampleStatus.COMPLETED, out.reward
            s.reward_components = episode_components(out.episode)
            return out.episode

        async def all_of() -> list[EpisodeResult]:
            # Every episode ends (and closes its environment) before a failure is raised.
            results = await asyncio.gather(*(one(s) for s in samples), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            return list(results)

        return asyncio.run_coroutine_threadsafe(all_of(), self._loop).result()

    def result(self, key: str) -> EpisodeResult | None:
        return self._results.get(key)

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self._results.pop(key, None)
            self._episodes.pop(key, None)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ on the loop
    def _runner(self, name: str) -> EnvRunner:
        runner = self._runners.get(name)
        if runner is None:
            runner = self._runners[name] = EnvRunner(name, self.env_kwargs, self.settings)
        return runner

    async def _reset(self, sample: Sample) -> None:
        name, task = task_of(sample)
        runner = self._runner(name)
        old = self._episodes.pop(sample.key, None)
        if old is not None and not old[0].done:  # regenerated: the old episode is abandoned
            await old[0].finish()
        episode = await AgentEpisode.start(runner, task, self.tokenizer)
        if episode.done:  # the reset failed: the sample ends with an empty response and the fallback reward
            self._results[sample.key] = (await episode.finish()).episode
            self.on_answer(sample, EnvAnswer([], True))
            return
        self._episodes[sample.key] = (episode, 0)
        self.on_answer(sample, EnvAnswer([], False, prompt_ids=episode.sequence.prompt_ids,
                                         tokens_left=episode.tokens_left))

    async def _step(self, sample: Sample, ended: SampleStatus) -> None:
        episode, start = self._episodes[sample.key]
        ids = sample.response_ids[start:]
        await episode.add_model_turn(ids, sample.response_logprobs[start:], sample.response_versions[start:],
                                     finished=ended == SampleStatus.COMPLETED)
        seq = episode.sequence
        n = len(sample.response_ids)
        if seq.response_ids[:n] != sample.response_ids or seq.loss_mask[:n] != sample.response_mask:
            raise RuntimeError(f"sample {sample.key}: the episode's token sequence and the sample's response differ")
        observation = seq.response_ids[n:]
        if episode.done:
            result = (await episode.finish()).episode
            self._results[sample.key] = result
            sample.metadata["turn_rewards"] = list(result.turn_rewards)
            sample.metadata["token_turns"] = seq.turn_of_token()
            self.on_answer(sample, EnvAnswer(observation, True))
            return
        self._episodes[sample.key] = (episode, n + len(observation))
        self.on_answer(sample, EnvAnswer(observation, False, tokens_left=episode.tokens_left))

    def _report(self, future) -> None:
        exc = future.exception()
        if exc is not None:
            log.error("agent environment work failed: %r", exc)
            self.on_error(exc)



def episode_components(r: EpisodeResult) -> dict[str, float]:
    """An episode's reward components as samples keep them: the outcome's, its score and turn count, prefixed
    by the environment's name."""
    components = {f"{r.env}/{k}": v for k, v in r.outcome.components.items()}
    return {**components, f"{r.env}/score": r.reward, f"{r.env}/turns": float(r.stats.turns)}
