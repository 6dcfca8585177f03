"""One agent episode at the token level: the environment session (rewards/envs) joined to the chat template
(render.py), the GLM tool-call parser (glm_tools.py) and the token sequence with its loss mask (sequence.py).

The rollout drives generation and hands each finished model turn over:

    episode = await AgentEpisode.start(runner, task, tokenizer)
    while not episode.done:
        out = <generate from episode.sequence.tokens, at most episode.tokens_left new tokens>
        await episode.add_model_turn(out.ids, out.logprobs, out.versions, finished=<stopped on a stop token>)
    result = await episode.finish()          # AgentEpisodeResult: sequence, loss mask, rewards, stats

A turn interrupted by an abort (APRIL, a weight update) is resumed by generating on from the tokens it has and
handing over the whole turn once it ends: nothing here sees the partial turn. `run_episode` is that loop for a
`generate` coroutine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from rewards.envs.api import Task
from rewards.envs.runner import EndReason, EnvRunner, EpisodeResult, EpisodeSession, TurnResult
from rollout.agent.glm_tools import parse_glm_turn
from rollout.agent.render import ChatRenderer
from rollout.agent.sequence import TokenSequence


@dataclass(frozen=True)
class ModelTurn:
    """What generation returns for one turn. `finished`: it ended on a stop token (not on the token limit)."""

    ids: list[int]
    logprobs: list[float] | None = None
    versions: list[int] | int = 0
    finished: bool = True


@dataclass
class AgentEpisodeResult:
    episode: EpisodeResult
    sequence: TokenSequence

    @property
    def reward(self) -> float:
        return self.episode.reward


class AgentEpisode:
    def __init__(self, session: EpisodeSession, renderer: ChatRenderer, sequence: TokenSequence):
        self.session, self.renderer, self.sequence = session, renderer, sequence

    @classmethod
    async def start(cls, runner: EnvRunner, task: Task, tokenizer: Any) -> "AgentEpisode":
        """Resets the environment and renders the first prompt. If the reset failed the episode is already done
        (end_reason RESET_FAILED) with an empty prompt: drop it, there is nothing to train on."""
        session = await runner.start(task)
        renderer = ChatRenderer(tokenizer, session.tools)
        prompt = renderer.prompt_ids(session.messages) if not session.done else []
        return cls(session, renderer, TokenSequence(prompt))

    @property
    def done(self) -> bool:
        return self.session.done

    @property
    def tokens_left(self) -> int:
        """The most new tokens the next turn may generate."""
        return self.session.tokens_left

    async def add_model_turn(self, ids: list[int], logprobs: list[float] | None = None,
                             versions: list[int] | int = 0, finished: bool = True) -> TurnResult:
        """Appends the model's turn, lets the environment answer it and appends the answer's tokens."""
        if self.done:
            raise RuntimeError(f"episode of task {self.session.task.id} is over "
                               f"({self.session.end_reason.value}); no more turns")
        if len(ids) > self.tokens_left:
            raise ValueError(f"the turn has {len(ids)} tokens; only {self.tokens_left} were left in the budget")
        self.sequence.add_model(ids, logprobs, versions)
        turn_index = self.sequence.model_turns - 1
        if not finished:
            self.session.turn_truncated(len(ids))
            return TurnResult([], 0.0, True, self.session.end_reason)
        turn = parse_glm_turn(self.renderer.decode_turn(ids), self.session.tools, id_prefix=f"call_{turn_index}_")
        result = await self.session.step(turn, model_tokens=len(ids))
        if result.done:
            return result
        history = self.session.messages[:len(self.session.messages) - len(result.observations)]
        observation_ids = self.renderer.observation_ids(history, result.observations, ids)
        if not self.session.add_observation_tokens(len(observation_ids)):
            return TurnResult([], result.reward, True, self.session.end_reason)
        self.sequence.add_observation(observation_ids)
        return result

    async def finish(self) -> AgentEpisodeResult:
        return AgentEpisodeResult(await self.session.finish(), self.sequence)


Generate = Callable[[list[int], int], Awaitable[ModelTurn]]


async def run_episode(runner: EnvRunner, task: Task, tokenizer: Any, generate: Generate) -> AgentEpisodeResult:
    """A whole episode with `generate(token_ids, max_new_tokens) -> ModelTurn`. A generation that raises ends the
    episode (ABORTED) and the exception propagates after the environment is closed."""
    episode = await AgentEpisode.start(runner, task, tokenizer)
    try:
        while not episode.done:
            out = await generate(episode.sequence.tokens, episode.tokens_left)
            await episode.add_model_turn(out.ids, out.logprobs, out.versions, out.finished)
    except BaseException:
        episode.session.end(EndReason.ABORTED)
        await episode.finish()
        raise
    return await episode.finish()


Expert = Callable[[Task, list], dict]


async def demonstrate_episode(runner: EnvRunner, task: Task, tokenizer: Any,
                              expert: Expert) -> AgentEpisodeResult | None:
    """An episode whose turns are `expert(task, messages so far)` (an assistant message), rendered as a model that
    follows the chat template would generate it: the token sequence the warm-up trains on, with the environment's
    real observations between the turns. None when the expert does not demonstrate the task (its first turn is
    None: tasks left for RL to learn)."""
    if expert(task, [dict(m) for m in task.prompt]) is None:
        return None
    episode = await AgentEpisode.start(runner, task, tokenizer)
    while not episode.done:
        ids = episode.renderer.assistant_ids(expert(task, list(episode.session.messages)))
        if len(ids) > episode.tokens_left:
            episode.session.turn_truncated(0)
            break
        await episode.add_model_turn(ids)
    return await episode.finish()
