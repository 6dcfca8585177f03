"""An OpenAI-compatible HTTP endpoint onto the engine pool, for agent harnesses that talk to a server
(`/v1/chat/completions`, `/v1/completions`, `/v1/models`). Token-in/token-out stays the internal path: this
server renders chat messages with the checkpoint's chat template, generates through the pool like evaluation does
(not part of any training batch) and decodes the result.

Bound to 127.0.0.1 unless configured otherwise; with an API key (read from the environment variable the config
names, so it never sits in a config file or a log) every request must carry `Authorization: Bearer <key>`.
Runs aiohttp (a dependency of ray[default]) on its own event loop in a daemon thread."""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid

from aiohttp import web

from rollout.protocol import EngineRequest

log = logging.getLogger(__name__)


class OpenAIServer:
    def __init__(self, pool, tokenizer, model_name: str, stop_token_ids: tuple[int, ...], host: str = "127.0.0.1",
                 port: int = 0, api_key: str | None = None, max_new_tokens: int = 512):
        self.pool, self.tokenizer, self.model_name = pool, tokenizer, model_name
        self.stop_token_ids, self.api_key, self.max_new_tokens = stop_token_ids, api_key, max_new_tokens
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self.host, self.port = host, port
        self._thread = threading.Thread(target=self._serve, name="openai-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the OpenAI-compatible server did not start")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # the port chosen when 0 was asked for
        log.info("OpenAI-compatible endpoint on %s", self.url)
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.api_key is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return _error(401, "invalid or missing API key", "authentication_error")
        return await handler(request)

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                              "owned_by": "slipstream"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        body, problem = await _json(request)
        if problem:
            return problem
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages: expected a non-empty list of chat messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=body.get("tools"), add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
        except Exception as exc:  # noqa: BLE001 - a malformed conversation is the client's error
            return _error(400, f"messages: cannot render with the chat template: {exc}")
        return await self._generate(body, list(ids), chat=True)

    async def _completions(self, request: web.Request) -> web.Response:
        body, problem = await _json(request)
        if problem:
            return problem
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            return _error(400, "prompt: expected a non-empty string or a list of token ids")
        return await self._generate(body, list(ids), chat=False)

    async def _generate(self, body: dict, ids: list[int], chat: bool) -> web.Response:
        if body.get("stream"):
            return _error(400, "stream: streaming responses are not supported")
        try:
            n = int(body.get("n", 1))
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.max_new_tokens)
            sampling = {"max_new_tokens": max_tokens, "temperature": float(body.get("temperature", 1.0)),
                        "top_p": float(body.get("top_p", 1.0)), "stop_token_ids": list(self.stop_token_ids)}
        except (TypeError, ValueError) as exc:
            return _error(400, f"bad sampling parameter: {exc}")
        if not 1 <= n <= 16 or max_tokens < 1:
            return _error(400, "n must be in 1..16 and max_tokens >= 1")
        rid = f"openai/{uuid.uuid4().hex}"
        requests = [EngineRequest(f"{rid}/{i}", ids, dict(sampling)) for i in range(n)]
        try:
            results = await asyncio.to_thread(self.pool.generate, requests)
        except RuntimeError as exc:
            return _error(503, str(exc), "server_error")
        choices, completion_tokens = [], 0
        for i, res in enumerate(results):
            text = self.tokenizer.decode(res.output_ids, skip_special_tokens=True)
            completion_tokens += len(res.output_ids)
            finish = {"stop": "stop", "length": "length"}.get(res.finish_reason, "stop")
            choices.append({"index": i, "finish_reason": finish,
                            **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})})
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) * n + completion_tokens}})


async def _json(request: web.Request):
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001
        return None, _error(400, "the request body is not JSON")
    if not isinstance(body, dict):
        return None, _error(400, "the request body must be a JSON object")
    return body, None


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status)
