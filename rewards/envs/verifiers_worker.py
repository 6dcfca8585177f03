"""The process that runs `verifiers` (v1) environments for rewards/envs/verifiers_env.py.

Run as a script (`python verifiers_worker.py`) by an interpreter that has verifiers 0.4.0; it imports nothing of
slipstream, so that interpreter needs nothing else (verifiers 0.4.0 wants openai>=2.54, sglang 0.5.23 pins
openai==2.8.0: they cannot share an environment). It speaks JSON lines: commands on stdin, events on the stdout
it was started with (fd 1 is then pointed at stderr, so library prints cannot corrupt the protocol).

    -> {"op": "init", "env": {<verifiers EnvConfig>}, "sys_path": [...]}
    <- {"op": "ready", "tasks": <number of tasks in the taskset>}  or  {"op": "fatal", "error": ...}
    -> {"op": "start", "episode": id, "index": i}          runs task i: Env.run_episode(task, ctx)
    <- {"op": "request", "episode": id, "messages": [...], "tools": [...]}   the harness asks the model
    -> {"op": "reply", "episode": id, "message": {OpenAI assistant message}}
    <- {"op": "done", "episode": id, "reward": r, "rewards": {...}, "metrics": {...}, "ok": bool, "errors": [...]}
    -> {"op": "cancel", "episode": id}

The model endpoint: the episode's `ModelContext` points verifiers' own `EvalClient` at a local OpenAI-compatible
endpoint served here, with one model name per episode; each chat-completions call becomes a "request" event and
waits for its "reply". Everything else (harness, tools, runtime, scoring) is verifiers' own machinery.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback

MODEL_PREFIX = "slipstream-episode-"


class Worker:
    def __init__(self, events) -> None:
        self.events = events
        self.env = None
        self.tasks: list = []
        self.base_url = ""
        self.running: dict[str, asyncio.Task] = {}
        self.waiting: dict[str, asyncio.Future] = {}

    def emit(self, event: dict) -> None:
        self.events.write(json.dumps(event, default=str) + "\n")
        self.events.flush()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 30)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        init = json.loads(await reader.readline())
        try:
            await self.init(init)
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the episodes
            self.emit({"op": "fatal", "error": traceback.format_exc(limit=20)})
            return
        async with self.env.serving():
            self.emit({"op": "ready", "tasks": len(self.tasks)})
            while line := await reader.readline():
                self.handle(json.loads(line))
        for task in self.running.values():
            task.cancel()

    async def init(self, init: dict) -> None:
        sys.path[:0] = init.get("sys_path", [])
        from verifiers.v1.utils.loaders import env_config_type, load_environment

        env_config = dict(init["env"])
        taskset_id = env_config.get("taskset", {}).get("id", "")
        config = env_config_type(taskset_id, env_config.get("id", "")).model_validate(env_config)
        self.env = load_environment(config)
        if not self.env.taskset.bounded:
            raise ValueError(f"taskset {taskset_id!r} is infinite; bound it (select a range) to use it here")
        self.tasks = list(self.env.taskset)
        self.base_url = await self.serve_model_endpoint()

    async def serve_model_endpoint(self) -> str:
        from aiohttp import web

        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    def handle(self, command: dict) -> None:
        op, episode = command.get("op"), command.get("episode")
        if op == "start":
            self.running[episode] = asyncio.create_task(self.play(episode, int(command["index"])))
        elif op == "reply":
            future = self.waiting.pop(episode, None)
            if future is not None and not future.done():
                future.set_result(command["message"])
        elif op == "cancel":
            task = self.running.pop(episode, None)
            if task is not None:
                task.cancel()
            future = self.waiting.pop(episode, None)
            if future is not None and not future.done():
                future.cancel()

    async def play(self, episode: str, index: int) -> None:
        from verifiers.v1 import EvalClientConfig, ModelContext

        try:
            if not 0 <= index < len(self.tasks):
                raise IndexError(f"task index {index} out of range: the taskset has {len(self.tasks)} tasks")
            ctx = ModelContext(model=MODEL_PREFIX + episode,
                               client=EvalClientConfig(base_url=self.base_url, api_key_var="SLIPSTREAM_VERIFIERS_KEY"))
            result = await self.env.run_episode(self.tasks[index], ctx)
            traces = result.traces
            rewards = {name: r.value for t in traces for name, r in t.rewards.items() if r is not None}
            metrics = {name: v for t in traces for name, v in t.metrics.items() if isinstance(v, (int, float))}
            errors = [f"{e.type}: {e.message}" for e in [*result.errors, *(e for t in traces for e in t.errors)]]
            self.emit({"op": "done", "episode": episode, "reward": sum(t.reward for t in traces),
                       "rewards": rewards, "metrics": metrics, "ok": result.ok, "errors": errors})
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the episode fails, the worker goes on
            self.emit({"op": "done", "episode": episode, "reward": 0.0, "rewards": {}, "metrics": {}, "ok": False,
                       "errors": [traceback.format_exc(limit=20)]})
        finally:
            self.running.pop(episode, None)

    async def chat_completions(self, request):
        from aiohttp import web

        body = await request.json()
        model = str(body.get("model", ""))
        episode = model[len(MODEL_PREFIX):] if model.startswith(MODEL_PREFIX) else None
        if episode not in self.running:
            return web.json_response({"error": {"message": f"no running episode for model {model!r}"}}, status=404)
        future = asyncio.get_running_loop().create_future()
        self.waiting[episode] = future
        self.emit({"op": "request", "episode": episode, "messages": body.get("messages", []),
                   "tools": body.get("tools") or []})
        message = await future
        tool_calls = message.get("tool_calls") or None
        choice = {"index": 0, "message": {"role": "assistant", "content": message.get("content"),
                                          **({"tool_calls": tool_calls} if tool_calls else {})},
                  "finish_reason": "tool_calls" if tool_calls else "stop"}
        completion = {"id": f"chatcmpl-{episode}-{time.monotonic_ns()}", "object": "chat.completion",
                      "created": int(time.time()), "model": model, "choices": [choice],
                      "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
        if not body.get("stream"):
            return web.json_response(completion)
        chunk = {**completion, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": choice["message"], "finish_reason": choice["finish_reason"]}]}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response


def main() -> None:
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    asyncio.run(Worker(events).run())


if __name__ == "__main__":
    main()
