"""`terminal`: a tiny in-memory file system with `ls`, `cat` and `write`. A token sits at the end of a chain of
notes ("moved to /srv/x/y") that starts at /srv/README, among decoy notes and decoy tokens; the goal is the
token written to /out/token.txt, then a turn without tool calls. Needs one `cat` per hop plus the `write`.

Outcome: 1 when /out/token.txt holds exactly the task's token (surrounding whitespace aside) when the episode
ends, else 0. The token is compared with the task's own data, so rewriting the notes, writing several
candidates, guessing or claiming success without writing all score 0. Optional per-turn reward: `hop_reward` for
the first `cat` of each note on the chain.
"""
from __future__ import annotations

import json
import posixpath
import random

from rewards.api import RewardResult
from rewards.envs.api import AssistantTurn, Message, StepResult, Task, ToolCall
from rewards.envs.builtin.common import draw_tasks
from rewards.envs.registry import register_env
from rewards.envs.tools import ToolEnvironment, ToolError, function_tool

ANSWER_PATH = "/out/token.txt"
MAX_FILE_CHARS = 4096
MAX_FILES = 256
_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]
TOOLS = [
    function_tool("ls", "Lists a directory: one entry per line, directories end with '/'.",
                  {"path": {"type": "string"}}),
    function_tool("cat", "Prints a file.", {"path": {"type": "string"}}),
    function_tool("write", "Writes (replaces) a file; parent directories are created.",
                  {"path": {"type": "string"}, "content": {"type": "string"}}),
]


def _token(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(12))


def _candidate(rng: random.Random):
    hops = rng.randint(2, 3)
    dirs = rng.sample(_WORDS, 5)
    chain = [f"/srv/{rng.choice(dirs)}/{rng.choice(_WORDS)}-{i}.txt" for i in range(hops)]
    token = _token(rng)
    files = {"/srv/README": f"Start here. The deploy token was moved; see {chain[0]}\n"}
    for here, there in zip(chain, chain[1:]):
        files[here] = f"Not here any more. The token was moved to {there}\n"
    files[chain[-1]] = f"deploy token: {token}\n"
    for d in dirs:  # decoys: notes that lead nowhere and tokens that are not the deploy token
        files.setdefault(f"/srv/{d}/old-{rng.choice(_WORDS)}.txt", f"stale token: {_token(rng)}\n")
    key = json.dumps(files, sort_keys=True)
    prompt = [{"role": "user", "content": (
        "Find the deploy token on this machine (start by reading /srv/README) and write exactly the token to "
        f"{ANSWER_PATH}. Use the ls, cat and write tools. When it is written, reply 'done' without calling a tool.")}]
    data = {"files": files, "token": token, "chain": chain}
    return key, lambda task_id: Task(task_id, prompt, TOOLS, data)


def generate_tasks(split: str, count: int, seed: int = 0) -> list[Task]:
    return draw_tasks("terminal", split, count, seed, _candidate)


def _normalize(path: str) -> str:
    if not path.startswith("/"):
        raise ToolError(f"paths are absolute (start with /): {path!r}")
    return posixpath.normpath(path)


@register_env("terminal", tasks=generate_tasks)
class TerminalEnv(ToolEnvironment):
    def __init__(self, hop_reward: float = 0.0):
        self.hop_reward = float(hop_reward)

    async def reset(self, task: Task) -> list[Message]:
        self.data = task.data
        self.files: dict[str, str] = dict(task.data["files"])
        self.hops_read: set[str] = set()
        self._new_hops = 0
        return [dict(m) for m in task.prompt]

    async def call_tool(self, call: ToolCall) -> str:
        path = _normalize(call.arguments["path"])
        if call.name == "ls":
            prefix = path.rstrip("/") + "/"
            entries = sorted({f[len(prefix):].split("/")[0] + ("/" if "/" in f[len(prefix):] else "")
                              for f in self.files if f.startswith(prefix)})
            if not entries:
                raise ToolError(f"ls: {path}: no such directory")
            return "\n".join(entries)
        if call.name == "cat":
            if path not in self.files:
                raise ToolError(f"cat: {path}: no such file")
            if path in self.data["chain"] and path not in self.hops_read:
                self.hops_read.add(path)
                self._new_hops += 1
            return self.files[path]
        if call.name == "write":
            content = call.arguments["content"]
            if len(content) > MAX_FILE_CHARS:
                raise ToolError(f"write: content longer than {MAX_FILE_CHARS} characters")
            if path not in self.files and len(self.files) >= MAX_FILES:
                raise ToolError("write: the disk is full")
            if any(f.startswith(path.rstrip("/") + "/") for f in self.files):
                raise ToolError(f"write: {path} is a directory")
            self.files[path] = content
            return f"wrote {len(content)} characters to {path}"
        raise ToolError(f"unknown tool {call.name!r}")

    def turn_reward(self, turn: AssistantTurn) -> float:
        new, self._new_hops = self._new_hops, 0
        return self.hop_reward * new

    async def finish_turn(self, turn: AssistantTurn) -> StepResult:
        return StepResult([], done=True)

    async def outcome(self) -> RewardResult:
        written = self.files.get(ANSWER_PATH)
        correct = float(written is not None and written.strip() == self.data["token"])
        return RewardResult(correct, {"correct": correct, "written": float(written is not None),
                                      "hops_read": float(len(self.hops_read))},
                            {"written": None if written is None else written[:100]})
