"""Environments written for `verifiers` (prime-rl's library, the v1 API of 0.4.0), run through our interface.

verifiers inverts control: its `Env.run_episode(task, ctx)` drives the episode and calls the model through a
client. The adapter runs that in a worker process (verifiers_worker.py) whose model endpoint turns each model
call into a request to us: `reset` starts the episode and returns the first request's messages and tools; `step`
answers the pending request with the model's turn and returns the messages the harness added before its next
request (tool results, a user turn), or done when the episode finished; `outcome` is the trace's reward (the sum
of its weighted `@vf.reward`s), with each reward as a component.

The worker runs under `python` (default: this interpreter), which must have verifiers 0.4.0. With sglang 0.5.23
in this environment it cannot: verifiers 0.4.0 requires openai>=2.54, sglang 0.5.23 pins openai==2.8.0. So give
it a separate virtualenv (`python -m venv agents-venv && agents-venv/bin/pip install verifiers==0.4.0`) and pass
`python: agents-venv/bin/python`. One worker per (python, env config) serves every episode of the process.

Tasks are the taskset's rows by position: Task(data={"index": i}) (`taskset_tasks` makes them).
"""
from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rewards.api import RewardResult
from rewards.envs.api import AssistantTurn, EpisodeStart, Environment, Message, StepResult, Task
from rewards.envs.registry import register_env

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("verifiers_worker.py")
_OBSERVATION_ROLES = ("system", "user", "tool")


class WorkerError(RuntimeError):
    """The worker could not start, died, or refused the episode."""


class VerifiersWorker:
    """One worker process and the episodes it runs; events are routed to each episode's queue."""

    def __init__(self, python: str, env_config: dict[str, Any], sys_path: list[str]):
        self.python, self.env_config, self.sys_path = python, env_config, sys_path
        self.process: asyncio.subprocess.Process | None = None
        self.queues: dict[str, asyncio.Queue] = {}
        self.tasks = 0
        self._ready: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count()

    async def ready(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            asyncio.ensure_future(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> None:
        try:
            self.process = await asyncio.create_subprocess_exec(
                self.python, str(WORKER), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=1 << 30, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.send({"op": "init", "env": self.env_config, "sys_path": self.sys_path})
            first = json.loads(await self.process.stdout.readline() or b'{"op": "eof"}')
            if first.get("op") != "ready":
                raise WorkerError(f"the verifiers worker ({self.python}) did not start: "
                                  f"{first.get('error') or 'it exited'}")
            self.tasks = int(first["tasks"])
            self._reader = asyncio.ensure_future(self._read())
            self._ready.set_result(None)
        except Exception as exc:  # noqa: BLE001 - every waiting reset gets it
            self._ready.set_exception(exc if isinstance(exc, WorkerError) else WorkerError(
                f"the verifiers worker ({self.python}) did not start: {type(exc).__name__}: {exc}"))
            self._ready.exception()  # marks it retrieved; each awaiting reset re-raises it
            self.kill()

    async def _read(self) -> None:
        while line := await self.process.stdout.readline():
            event = json.loads(line)
            queue = self.queues.get(event.get("episode"))
            if queue is not None:
                queue.put_nowait(event)
        for queue in self.queues.values():  # the worker died: every running episode fails
            queue.put_nowait({"op": "died"})
        self._ready = None  # the next reset starts a fresh worker

    def send(self, command: dict[str, Any]) -> None:
        self.process.stdin.write((json.dumps(command) + "\n").encode())

    def open(self) -> tuple[str, asyncio.Queue]:
        episode = f"{os.getpid()}-{next(self._ids)}"
        self.queues[episode] = asyncio.Queue()
        return episode, self.queues[episode]

    def close(self, episode: str) -> None:
        if self.queues.pop(episode, None) is not None and self.process and self.process.returncode is None:
            self.send({"op": "cancel", "episode": episode})

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


_WORKERS: dict[str, VerifiersWorker] = {}


def worker_for(python: str, env_config: dict[str, Any], sys_path: list[str]) -> VerifiersWorker:
    """The worker for this configuration on the running event loop (its pipes belong to one loop; a worker
    whose loop is gone sees its stdin close and exits)."""
    key = json.dumps([id(asyncio.get_running_loop()), python, env_config, sys_path], sort_keys=True)
    worker = _WORKERS.get(key)
    if worker is None or (worker.process is not None and worker.process.returncode is not None):
        worker = _WORKERS[key] = VerifiersWorker(python, env_config, sys_path)
    return worker


async def close_workers() -> None:
    """Stops the workers of the running event loop (call it before the loop ends; at exit the rest are killed)."""
    prefix = f"[{id(asyncio.get_running_loop())}, "
    for key in [k for k in _WORKERS if k.startswith(prefix)]:
        worker = _WORKERS.pop(key)
        if worker.process is not None and worker.process.returncode is None:
            worker.process.stdin.close()  # the worker ends its episodes and exits
            try:
                await asyncio.wait_for(worker.process.wait(), timeout=10)
            except asyncio.TimeoutError:
                worker.kill()
                await worker.process.wait()
        if worker._reader is not None:
            await asyncio.gather(worker._reader, return_exceptions=True)


@atexit.register
def _kill_workers() -> None:
    for worker in _WORKERS.values():
        worker.kill()
    _WORKERS.clear()


def taskset_tasks(count: int, start: int = 0, prefix: str = "verifiers") -> list[Task]:
    """Tasks for rows start..start+count-1 of the taskset."""
    return [Task(f"{prefix}/{i}", data={"index": i}) for i in range(start, start + count)]


@register_env("verifiers")
class VerifiersEnv(Environment):
    """`taskset`: the verifiers taskset id (an installed package or a module path); `env`: an Env id to pair it
    with ("" = the taskset's own or SingleAgentEnv); `config`: more of the verifiers EnvConfig, merged in (the
    agent's runtime defaults to the local `subprocess` one: verifiers' own default is a remote Prime box)."""

    def __init__(self, taskset: str, env: str = "", config: dict[str, Any] | None = None, python: str = "",
                 sys_path: list[str] | None = None):
        env_config = {"taskset": {"id": taskset}, "agent": {"runtime": {"type": "subprocess"}}}
        if env:
            env_config["id"] = env
        _merge(env_config, config or {})
        self.python, self.env_config = python or sys.executable, env_config
        self.sys_path = list(sys_path or [os.getcwd()])
        self.worker: VerifiersWorker | None = None
        self.episode: str | None = None
        self.sent: list[dict[str, Any]] = []
        self.tools: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.interrupted = False

    async def reset(self, task: Task) -> EpisodeStart:
        self.worker = worker_for(self.python, self.env_config, self.sys_path)
        await self.worker.ready()
        index = task.data.get("index")
        if not isinstance(index, int):
            raise ValueError(f"task {task.id}: a verifiers task needs data={{'index': <row of the taskset>}}")
        self.episode, self.queue = self.worker.open()
        self.worker.send({"op": "start", "episode": self.episode, "index": index})
        event = await self._next()
        if event["op"] != "request":
            raise WorkerError(f"the verifiers episode ended before asking the model: {event.get('errors')}")
        self.tools = list(event["tools"])
        self.sent = list(event["messages"])
        return EpisodeStart([_observation(m) for m in event["messages"]], self.tools)

    async def step(self, turn: AssistantTurn) -> StepResult:
        if self.interrupted:
            raise WorkerError("an earlier step was interrupted (a timeout): the verifiers episode is out of step")
        self.worker.send({"op": "reply", "episode": self.episode, "message": turn.to_openai()})
        self.interrupted = True
        event = await self._next()
        self.interrupted = False
        if event["op"] == "done":
            return StepResult([], done=True)
        messages = event["messages"]
        known = len(self.sent)
        if len(messages) <= known or [m.get("role") for m in messages[:known]] != [m.get("role") for m in self.sent] \
                or messages[known].get("role") != "assistant":
            raise WorkerError("the verifiers harness rewrote the conversation (compaction, a new context); only "
                              "conversations that grow by appending are supported")
        self.sent = list(messages)
        return StepResult([_observation(m) for m in messages[known + 1:]])

    async def outcome(self) -> RewardResult:
        if self.result is None:
            return RewardResult(0.0, {"finished": 0.0}, {"reason": "the verifiers episode did not finish"})
        components = {f"rewards/{k}": float(v) for k, v in self.result["rewards"].items()}
        components.update({f"metrics/{k}": float(v) for k, v in self.result["metrics"].items()})
        components["finished"] = 1.0
        components["ok"] = float(self.result["ok"])
        return RewardResult(float(self.result["reward"]), components, {"errors": self.result["errors"]})

    async def close(self) -> None:
        if self.worker is not None and self.episode is not None:
            self.worker.close(self.episode)

    async def _next(self) -> dict[str, Any]:
        event = await self.queue.get()
        if event["op"] == "died":
            raise WorkerError("the verifiers worker died")
        if event["op"] == "done":
            self.result = event
            if not event["ok"] and event["errors"]:
                log.warning("verifiers episode %s failed: %s", self.episode, event["errors"][-1][-500:])
        return event


def _observation(message: dict[str, Any]) -> Message:
    """A message of the harness's conversation as an observation: text content (parts joined), no assistant."""
    role = message.get("role")
    if role not in _OBSERVATION_ROLES:
        raise WorkerError(f"the verifiers harness added a {role!r} message between model turns")
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    out: Message = {"role": role, "content": content or ""}
    if role == "tool" and message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
