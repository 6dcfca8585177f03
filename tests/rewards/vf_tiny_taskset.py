"""A small environment written for `verifiers` (0.4.0, the v1 API), for the adapter's tests; imported only by the
verifiers worker, under an interpreter that has verifiers (taskset id: `tests.rewards.vf_tiny_taskset`).

A taskset of additions; a harness whose program runs in-process (the v1 contract: every model call goes through
the interception endpoint) and offers one tool, `add`; a task reward that checks the final message against the
task's own sum. Task 2's harness crashes (a harness failure must reach the adapter as a failed episode)."""
from __future__ import annotations

import json

import httpx
import verifiers.v1 as vf
from verifiers.v1.runtimes import ProgramResult

ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
PAIRS = [(2, 3), (40, 2), (7, 8)]


class AdditionData(vf.TaskData):
    a: int
    b: int


class AdditionTask(vf.Task[AdditionData]):
    @vf.reward
    async def correct(self, trace) -> float:
        last = trace.assistant_messages[-1].content if trace.assistant_messages else ""
        return float(str(self.data.a + self.data.b) in (last or "").split())


class AdditionTaskset(vf.Taskset[AdditionTask]):
    def load(self):
        for a, b in PAIRS:
            yield AdditionTask(AdditionData(prompt=f"What is {a} + {b}? Use the add tool.", a=a, b=b,
                                            system_prompt="You are a careful assistant."))


class AdditionHarnessConfig(vf.HarnessConfig):
    pass


class AdditionHarness(vf.Harness[AdditionHarnessConfig]):
    APPENDS_SYSTEM_PROMPT = True
    EXECUTES_CODE = False
    NEEDS_CONTAINER = False

    async def launch(self, ctx, trace, runtime, endpoint, secret, mcp_urls, data, **kwargs) -> ProgramResult:
        system, prompt = self.resolve_prompt(data)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if data.b == 8:
            raise RuntimeError("the harness program crashed")
        async with httpx.AsyncClient(timeout=60) as http:
            for _ in range(6):
                reply = await http.post(f"{endpoint}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                        json={"model": ctx.model, "messages": messages, "tools": [ADD_TOOL]})
                reply.raise_for_status()
                message = reply.json()["choices"][0]["message"]
                messages.append({k: v for k, v in message.items() if v is not None})
                if not message.get("tool_calls"):
                    break
                for call in message["tool_calls"]:
                    args = json.loads(call["function"]["arguments"])
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": str(args["a"] + args["b"])})
        return ProgramResult(exit_code=0, stdout="", stderr="")


__all__ = ["AdditionTaskset", "AdditionHarness"]
