"""Runs environments for the rollout, one `EpisodeSession` per episode, and isolates them from it.

The caller drives generation; the session drives the environment:

    session = await runner.start(task)               # reset (timed); session.messages, session.tools
    while not session.done:
        turn = <generate and parse the model's turn>   # at most session.tokens_left tokens
        result = await session.step(turn, model_tokens=n)   # timed; malformed calls answered here
        if not result.done:
            ids = <tokenize result.observations>
            session.add_observation_tokens(len(ids))      # False: over the budget, the episode ended; do not append
    episode = await session.finish()                 # the outcome reward (timed), close, stats

Limits: `step_timeout_s` per environment call, `episode_timeout_s` for the environment's time over the whole
episode (generation time is not counted: it depends on engine load and on pauses for weight updates), `max_turns`
model turns, `max_tokens` tokens after the prompt (model and observation tokens). An environment that raises,
hangs or returns garbage ends the episode (`on_env_error="end"`) or is answered to the model as an error message
(`"reply"`); either way it is counted and logged, and the caller never sees an exception. As with rewards, an
environment that blocks the event loop in synchronous code cannot be interrupted: blocking work belongs in
`asyncio.to_thread` or a subprocess.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from rewards.api import RewardResult
from rewards.envs.api import (AssistantTurn, EpisodeStart, Message, StepResult, Task, check_observations,
                              check_step_result, tool_message)
from rewards.envs.registry import EnvSpec, load_env

log = logging.getLogger(__name__)


class EndReason(str, enum.Enum):
    DONE = "done"                          # the environment ended the episode
    MAX_TURNS = "max_turns"
    TOKEN_BUDGET = "token_budget"
    ENV_ERROR = "env_error"                # a call raised or returned garbage (on_env_error="end")
    ENV_TIMEOUT = "env_timeout"            # a call ran past step_timeout_s
    EPISODE_TIMEOUT = "episode_timeout"    # the environment used up episode_timeout_s
    RESET_FAILED = "reset_failed"          # the episode never started; nothing to train on
    ABORTED = "aborted"                    # the caller ended it (generation failed)


@dataclass(frozen=True)
class EnvSettings:
    step_timeout_s: float = 30.0
    episode_timeout_s: float = 300.0
    max_turns: int = 8
    max_tokens: int = 4096
    on_env_error: Literal["end", "reply"] = "end"
    fallback_score: float = 0.0  # the outcome when the environment cannot give one
    close_timeout_s: float = 10.0
    max_observation_chars: int = 16384  # per message; longer ones are cut (a tool printing megabytes)

    def __post_init__(self) -> None:
        for name in ("step_timeout_s", "episode_timeout_s", "close_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns: must be >= 1, got {self.max_turns}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.max_observation_chars < 1:
            raise ValueError(f"max_observation_chars: must be >= 1, got {self.max_observation_chars}")
        if self.on_env_error not in ("end", "reply"):
            raise ValueError(f"on_env_error: must be 'end' or 'reply', got {self.on_env_error!r}")
        if not math.isfinite(self.fallback_score):
            raise ValueError(f"fallback_score: must be finite, got {self.fallback_score}")


@dataclass
class EpisodeStats:
    turns: int = 0
    tool_calls: int = 0        # every call the model made, malformed ones included
    failed_calls: int = 0      # well-formed calls the environment answered with an error
    unanswered_calls: int = 0  # well-formed calls lost to an environment failure
    malformed: Counter = field(default_factory=Counter)  # MalformedKind value -> count
    env_errors: int = 0
    env_timeouts: int = 0
    env_time_s: float = 0.0
    model_tokens: int = 0
    observation_tokens: int = 0

    @property
    def malformed_calls(self) -> int:
        return sum(self.malformed.values())

    @property
    def successful_calls(self) -> int:
        return self.tool_calls - self.malformed_calls - self.failed_calls - self.unanswered_calls


@dataclass(frozen=True)
class TurnResult:
    """What the caller appends after the model's turn: `observations` (none once `done`) and this turn's reward."""

    observations: list[Message]
    reward: float
    done: bool
    end_reason: EndReason | None = None


@dataclass
class EpisodeResult:
    env: str
    task_id: str
    outcome: RewardResult
    turn_rewards: list[float]
    end_reason: EndReason
    stats: EpisodeStats
    messages: list[Message]
    tools: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)

    @property
    def reward(self) -> float:
        return self.outcome.score

    @property
    def tokens(self) -> int:
        return self.stats.model_tokens + self.stats.observation_tokens


class _EnvFailure(Exception):
    def __init__(self, reason: EndReason, message: str):
        super().__init__(message)
        self.reason = reason


class EnvRunner:
    """Starts episodes of one environment. `stats` counts over all its episodes (like RewardRunner.stats)."""

    def __init__(self, env: str | EnvSpec, kwargs: dict[str, Any] | None = None,
                 settings: EnvSettings = EnvSettings()):
        self.spec = env if isinstance(env, EnvSpec) else load_env(env, kwargs)
        self.settings = settings
        self.stats: Counter = Counter()

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self, task: Task) -> "EpisodeSession":
        """A started episode; if the environment could not be made or reset, a session that is already done
        (end_reason RESET_FAILED) whose `finish()` gives the fallback outcome."""
        self.stats["episodes"] += 1
        session = EpisodeSession(self, task)
        await session._start()
        return session


class EpisodeSession:
    def __init__(self, runner: EnvRunner, task: Task):
        self._runner, self.task = runner, task
        self.settings = runner.settings
        self.env: Any = None
        self.messages: list[Message] = []
        self.tools: list[dict[str, Any]] = list(task.tools)
        self.turn_rewards: list[float] = []
        self.stats = EpisodeStats()
        self.errors: list[str] = []
        self.end_reason: EndReason | None = None
        self._result: EpisodeResult | None = None

    @property
    def done(self) -> bool:
        return self.end_reason is not None

    @property
    def tokens_left(self) -> int:
        return max(0, self.settings.max_tokens - self.stats.model_tokens - self.stats.observation_tokens)

    def end(self, reason: EndReason) -> None:
        """Ends the episode (the first reason given stays)."""
        if self.end_reason is None:
            self.end_reason = reason

    async def _start(self) -> None:
        try:
            made = self._runner.spec.make()
            self.env = await made if inspect.isawaitable(made) else made
            for method in ("reset", "step", "outcome"):
                if not callable(getattr(self.env, method, None)):
                    raise TypeError(f"the environment object {type(self.env).__name__} has no {method}()")
            start = await self._call(lambda: self.env.reset(self.task), "reset")
            if isinstance(start, EpisodeStart):
                messages = check_observations(list(start.messages))
                if start.tools is not None:
                    self.tools = list(start.tools)
            else:
                messages = check_observations(start)
            if not messages:
                raise ValueError("reset returned no messages")
            self.messages = list(messages)
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            reason = exc.reason if isinstance(exc, _EnvFailure) else EndReason.ENV_ERROR
            self._count_failure(reason, f"reset: {_describe(exc)}")
            self.end(EndReason.RESET_FAILED)
            self._runner.stats["reset_failures"] += 1

    async def step(self, turn: AssistantTurn, model_tokens: int) -> TurnResult:
        """Hands the model's turn to the environment (its well-formed calls; malformed ones are answered here)."""
        if self.done:
            raise RuntimeError(f"episode of task {self.task.id} is over ({self.end_reason.value}); no more steps")
        if model_tokens < 0:
            raise ValueError(f"model_tokens must be >= 0, got {model_tokens}")
        self.stats.turns += 1
        self.stats.model_tokens += model_tokens
        self.stats.tool_calls += turn.call_count
        for bad in turn.malformed:
            self.stats.malformed[bad.kind.value] += 1
        self.messages.append(turn.to_message())
        if turn.malformed and not turn.tool_calls:
            result = StepResult([])  # nothing well-formed to run: the environment does not see this turn
        else:
            try:
                clean = dataclasses.replace(turn, malformed=())
                result = check_step_result(await self._call(lambda: self.env.step(clean), "step"))
            except Exception as exc:  # noqa: BLE001
                reason = exc.reason if isinstance(exc, _EnvFailure) else EndReason.ENV_ERROR
                self.stats.unanswered_calls += len(turn.tool_calls)
                error = self._count_failure(reason, f"step {self.stats.turns}: {_describe(exc)}")
                if self.settings.on_env_error == "end" or reason is EndReason.EPISODE_TIMEOUT:
                    self.turn_rewards.append(0.0)  # one reward per model turn, always
                    self.end(reason)
                    return self._turn_result([], 0.0)
                result = StepResult(_error_replies(turn, error))
        self.stats.failed_calls += min(result.failed_calls, len(turn.tool_calls))
        observations = _clip(_with_malformed_replies(turn, result.observations), self.settings.max_observation_chars)
        self.turn_rewards.append(float(result.reward))
        if result.done:
            self.end(EndReason.DONE)
        elif self.stats.turns >= self.settings.max_turns:
            self.end(EndReason.MAX_TURNS)
        elif self.tokens_left <= 0:
            self.end(EndReason.TOKEN_BUDGET)
        if self.done:
            return self._turn_result([], float(result.reward))
        self.messages.extend(observations)
        return self._turn_result(observations, float(result.reward))

    def turn_truncated(self, model_tokens: int) -> None:
        """The model's turn used the last of the token budget before it ended: the turn counts (reward 0), the
        environment does not see it, and the episode ends (TOKEN_BUDGET)."""
        if self.done:
            raise RuntimeError(f"episode of task {self.task.id} is over ({self.end_reason.value})")
        self.stats.turns += 1
        self.stats.model_tokens += model_tokens
        self.turn_rewards.append(0.0)
        self.end(EndReason.TOKEN_BUDGET)

    def add_observation_tokens(self, count: int) -> bool:
        """Counts the tokens the last observations render to. False when they leave the model no token of the
        budget: the episode ends (TOKEN_BUDGET) and the caller must not append them."""
        if self.done:
            return False
        if count >= self.tokens_left:
            self.end(EndReason.TOKEN_BUDGET)
            return False
        self.stats.observation_tokens += count
        return True

    async def finish(self) -> EpisodeResult:
        """The outcome (asked once, timed; the fallback score if the environment fails) and clean-up. Idempotent."""
        if self._result is not None:
            return self._result
        self.end(EndReason.ABORTED)
        outcome = RewardResult(self.settings.fallback_score)
        if self.end_reason is not EndReason.RESET_FAILED:
            try:
                result = await self._call(self.env.outcome, "outcome", budgeted=False)
                if not isinstance(result, RewardResult):
                    raise TypeError(f"outcome returned {type(result).__name__}, not RewardResult")
                outcome = result
            except Exception as exc:  # noqa: BLE001
                self._count_failure(exc.reason if isinstance(exc, _EnvFailure) else EndReason.ENV_ERROR,
                                    f"outcome: {_describe(exc)}")
        await self._close()
        self._runner.stats[f"end/{self.end_reason.value}"] += 1
        self._result = EpisodeResult(self._runner.name, self.task.id, outcome, list(self.turn_rewards),
                                     self.end_reason, self.stats, list(self.messages), list(self.tools),
                                     list(self.errors))
        return self._result

    async def _close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is None:
            return
        try:
            await asyncio.wait_for(close(), timeout=self.settings.close_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failing clean-up costs a log line, not the episode
            self.errors.append(f"close: {_describe(exc)}")
            log.error("environment %r failed to close (task %s): %s", self._runner.name, self.task.id,
                      _describe(exc))

    async def _call(self, make: Callable[[], Awaitable[Any]], what: str, budgeted: bool = True) -> Any:
        """Runs one environment call under the step timeout and what is left of the episode's time."""
        limit, reason = self.settings.step_timeout_s, EndReason.ENV_TIMEOUT
        if budgeted:
            left = self.settings.episode_timeout_s - self.stats.env_time_s
            if left <= 0:
                raise _EnvFailure(EndReason.EPISODE_TIMEOUT, f"{what}: no environment time left")
            if left < limit:
                limit, reason = left, EndReason.EPISODE_TIMEOUT
        started = time.monotonic()
        try:
            return await asyncio.wait_for(make(), timeout=limit)
        except asyncio.TimeoutError:
            raise _EnvFailure(reason, f"{what} timed out after {limit:.3g}s") from None
        finally:
            self.stats.env_time_s += time.monotonic() - started

    def _count_failure(self, reason: EndReason, error: str) -> str:
        if reason in (EndReason.ENV_TIMEOUT, EndReason.EPISODE_TIMEOUT):
            self.stats.env_timeouts += 1
            self._runner.stats["env_timeouts"] += 1
        else:
            self.stats.env_errors += 1
            self._runner.stats["env_errors"] += 1
        self.errors.append(error)
        log.error("environment %r failed on task %s: %s", self._runner.name, self.task.id, error)
        return error

    def _turn_result(self, observations: list[Message], reward: float) -> TurnResult:
        return TurnResult(observations, reward, self.done, self.end_reason)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _EnvFailure) else f"{type(exc).__name__}: {exc}"


def _clip(messages: list[Message], limit: int) -> list[Message]:
    out = []
    for message in messages:
        content = message["content"]
        if len(content) > limit:
            message = {**message, "content": content[:limit] + f"\n[... {len(content) - limit} characters cut]"}
        out.append(message)
    return out


def _error_replies(turn: AssistantTurn, error: str) -> list[Message]:
    text = f"Error: the environment failed to answer ({error}). Try again or finish."
    if turn.tool_calls:
        return [tool_message(call.id, text) for call in turn.tool_calls]
    return [{"role": "user", "content": text}]


def _with_malformed_replies(turn: AssistantTurn, observations: list[Message]) -> list[Message]:
    """The environment's observations with an error reply for each malformed call, in call order when the
    environment answered each well-formed call with one tool message (else after them)."""
    if not turn.malformed:
        return list(observations)
    errors = {bad.index: tool_message(bad.id, f"Error: {bad.error}") for bad in turn.malformed}
    tool_replies = [m for m in observations if m["role"] == "tool"]
    if len(tool_replies) != len(turn.tool_calls) or len(tool_replies) != len(observations):
        return list(observations) + [errors[i] for i in sorted(errors)]
    answers = {call.index: reply for call, reply in zip(turn.tool_calls, tool_replies)}
    answers.update(errors)
    return [answers[i] for i in sorted(answers)]
