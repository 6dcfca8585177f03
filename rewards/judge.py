"""A small async client for an LLM judge behind any OpenAI-compatible chat-completions endpoint.

The API key is read from the environment at request time, from a variable whose *name* is configured; the client
never stores the key, so it cannot leak through `repr`, pickling (Ray ships reward kwargs to workers) or logs.
Every error this module raises is a `JudgeError` whose message has been scrubbed of the key and which is raised
`from None`, so the underlying httpx exception (which holds the request and its headers) is not chained into
tracebacks.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import httpx

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """The judge could not give a usable answer (unreachable, HTTP error, malformed or unparseable reply)."""


@dataclass(frozen=True)
class ChatJudge:
    """`url` is the API base (".../v1"; "/chat/completions" is appended unless already there).

    `api_key_env` names the environment variable holding the key; when it is unset or empty no Authorization
    header is sent (local SGLang / vLLM judges need none).
    """

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 2
    retry_backoff_s: float = 0.5
    temperature: float = 0.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.url or not self.model:
            raise ValueError("the judge needs both judge_url and judge_model")

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def _api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def _scrub(self, text: str) -> str:
        key = self._api_key()
        return text.replace(key, "***") if key else text

    async def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant text of one chat completion; retries transient failures, then raises JudgeError."""
        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        last_problem = "no attempt made"
        # A client per call: rewards may run under successive asyncio.run loops, and a pooled client is tied to
        # the loop that created it. Judge latency dwarfs the connection setup.
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for attempt in range(self.max_retries + 1):
                if attempt:
                    await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
                try:
                    response = await client.post(self.endpoint, json=body, headers=headers)
                except httpx.HTTPError as exc:  # connection refused, timeout, protocol error
                    last_problem = f"{type(exc).__name__}: {exc}"
                    logger.debug("judge request failed (attempt %d): %s", attempt + 1, self._scrub(last_problem))
                    continue
                if response.status_code in _RETRY_STATUS:
                    last_problem = f"HTTP {response.status_code}: {response.text[:200]}"
                    continue
                if response.status_code != 200:  # 401/403/404/400: retrying will not help
                    self._fail(f"HTTP {response.status_code}: {response.text[:200]}")
                return self._content(response)
        self._fail(f"gave up after {self.max_retries + 1} attempt(s); last: {last_problem}")

    async def ask_verdict(self, messages: list[dict[str, str]]) -> str:
        """"correct" / "incorrect" / "abstained"."""
        reply = await self.complete(messages)
        try:
            return parse_verdict(reply)
        except JudgeError as exc:
            self._fail(str(exc))

    async def ask_claim_labels(self, messages: list[dict[str, str]], n_claims: int) -> list[bool]:
        reply = await self.complete(messages)
        try:
            return parse_claim_labels(reply, n_claims)
        except JudgeError as exc:
            self._fail(str(exc))

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            self._fail(f"malformed chat-completions reply: {response.text[:200]}")
        if not isinstance(content, str):
            self._fail(f"chat-completions reply has no text content: {type(content).__name__}")
        return content

    def _fail(self, problem: str):
        raise JudgeError(self._scrub(f"judge {self.model!r} at {self.endpoint}: {problem}")) from None


_VERDICT_RE = re.compile(r"\b(INCORRECT|CORRECT|ABSTAINED|ABSTAIN|NOT[ _]ATTEMPTED)\b")
_VERDICT_MAP = {"INCORRECT": "incorrect", "CORRECT": "correct", "ABSTAINED": "abstained", "ABSTAIN": "abstained",
                "NOT_ATTEMPTED": "abstained", "NOT ATTEMPTED": "abstained"}
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def parse_verdict(text: str) -> str:
    """"correct" / "incorrect" / "abstained" from a judge reply.

    Judges are told to answer with one word but often wrap it ("Verdict: **CORRECT**."). The *last* verdict word
    counts, since explanations tend to come first and the decision last; reasoning blocks are ignored.
    """
    cleaned = _THINK_RE.sub(" ", text or "").upper()
    found = _VERDICT_RE.findall(cleaned)
    if not found:
        raise JudgeError(f"judge reply has no CORRECT/INCORRECT/ABSTAINED verdict: {text[:120]!r}")
    return _VERDICT_MAP[found[-1]]


_CLAIM_LINE_RE = re.compile(r"^\s*\[?(\d+)\]?\s*[:.)-]?\s*\**\s*(SUPPORTED|UNSUPPORTED|NOT SUPPORTED)\b",
                            re.IGNORECASE | re.MULTILINE)


def parse_claim_labels(text: str, n_claims: int) -> list[bool]:
    """Per-claim supported flags from lines like "3: SUPPORTED"; every claim must be labelled exactly once."""
    cleaned = _THINK_RE.sub(" ", text or "")
    labels: dict[int, bool] = {}
    for number, word in _CLAIM_LINE_RE.findall(cleaned):
        labels[int(number)] = word.upper() == "SUPPORTED"
    missing = [i for i in range(1, n_claims + 1) if i not in labels]
    if missing:
        raise JudgeError(f"judge reply does not label claim(s) {missing}: {text[:120]!r}")
    return [labels[i] for i in range(1, n_claims + 1)]


def judge_from_kwargs(judge_url: str | None, judge_model: str | None, judge_api_key_env: str = "OPENAI_API_KEY",
                      **options: Any) -> ChatJudge | None:
    """None when no judge is configured (judge_url empty); otherwise a ChatJudge."""
    if not judge_url:
        return None
    if not judge_model:
        raise ValueError("judge_url is set but judge_model is not")
    return ChatJudge(judge_url, judge_model, judge_api_key_env, **options)
