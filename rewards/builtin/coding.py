"""The `coding` reward: run the response's code against the task's tests in the local sandbox.

Label: {"tests": ["assert add(1, 2) == 3", ...], "entry": "optional trusted setup code", "entry_point":
"optional function name"}, or just the list of tests; {"test": ..., "entry_point": ...} (a HumanEval row) too.
The test shapes (assert statements, HumanEval's `check(candidate)`) and what is refused are in coding_shapes.py.
Score = passed / total, or 1/0 with `all_or_nothing`.

Two programs share each run's sandbox (rewards/sandbox, `Peer`), each with its own private uid:
  * the solution's server (code_harness/solution_server.py) runs the solution's module code in a fresh child per
    test and answers calls of its functions;
  * the judge (code_harness/judge.py) runs the tests, the `entry` code and `check(candidate)`, and decides each
    verdict. The solution's names reach it as proxies: arguments and return values cross as plain data of exact
    builtin types (code_harness/wire.py), so every comparison runs on the judge's own values and a returned object
    cannot carry its own `__eq__`. The tests reach the judge on its stdin and live only in its memory; the verdicts
    leave on a pipe only the judge holds. The solution's processes sit in a pid namespace nested in the judge's:
    they cannot see, signal or ptrace the judge, and share no writable fd or memory with it.
So printing fake markers, writing to inherited fds, exiting early, killing processes, reading the test file or
returning objects that compare equal to anything all fail the test. See docs/rewards.md, "Reward hacking".
"""
from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from rewards.api import RewardInput, RewardResult
from rewards.builtin.coding_shapes import plan_tests
from rewards.registry import register_reward
from rewards.sandbox import Peer, SandboxLimits, SandboxResult, isolation, run_sandboxed

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_HARNESS = Path(__file__).with_name("code_harness")
_MAX_MESSAGE_BYTES = 8 << 20


def extract_code(response: str) -> str:
    """The last ```python fenced block of the response, else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


@lru_cache(maxsize=None)
def _harness_file(name: str) -> str:
    return (_HARNESS / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class _Task:
    tests: list[str]
    entry: str
    entry_point: str | None


def _parse_label(label: Any) -> _Task:
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except ValueError:
            raise ValueError("coding reward: label must be {'tests': [...], 'entry': ..., 'entry_point': ...} or a "
                             "list of tests") from None
    entry_point = None
    if isinstance(label, (list, tuple)):
        tests, entry = list(label), ""
    elif isinstance(label, dict) and ("tests" in label or "test" in label):
        tests, entry = label.get("tests", label.get("test")), label.get("entry") or ""
        tests = [tests] if isinstance(tests, str) else list(tests)
        entry_point = label.get("entry_point")
    else:
        raise ValueError("coding reward needs a label {'tests': [...], 'entry': optional code, 'entry_point': "
                         "optional name} on every sample")
    if not tests or not all(isinstance(t, str) for t in tests) or not isinstance(entry, str):
        raise ValueError("coding reward: 'tests' must be a non-empty list of code strings and 'entry' a string")
    return _Task(tests, entry, entry_point)


def _collect(result: SandboxResult, total: int) -> list[dict[str, str]]:
    cases: list[dict[str, str] | None] = [None] * total
    for line in result.results.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "judge_error" in record:
            raise RuntimeError(f"coding reward: the judge failed: {record['judge_error']}")
        if not (isinstance(record, list) and len(record) == 3):
            continue
        index, status, detail = record
        if isinstance(index, int) and 0 <= index < total and cases[index] is None:
            cases[index] = {"status": str(status), "detail": str(detail)[:500]}
    missing = "timeout" if result.timed_out else "crash"
    why = "the sandbox ran out of wall-clock time" if result.timed_out else f"sandbox exited ({result.returncode})"
    return [c if c is not None else {"status": missing, "detail": why} for c in cases]


_ADD_TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}


@register_reward("coding", examples=[
    RewardInput("Write add(a, b).", "```python\ndef add(a, b):\n    return a + b\n```", label=_ADD_TESTS),
    RewardInput("Write add(a, b).", "def add(a, b):\n    return 4 if a == 2 else 0\n", label=_ADD_TESTS),
    RewardInput("Write add(a, b).", "```python\ndef add(a, b):\n    return a - b\n```", label=_ADD_TESTS),
])
async def coding(
    sample: RewardInput,
    *,
    language: str = "python",
    timeout_s: float = 5.0,
    cpu_s: int | None = None,
    memory_mb: int = 1024,
    max_processes: int = 64,
    max_file_mb: int = 16,
    max_output_bytes: int = 4096,
    all_or_nothing: bool = False,
) -> RewardResult:
    """Pass fraction of the task's unit tests (see the module doc). `timeout_s` and `cpu_s` are per test case."""
    if language != "python":
        raise ValueError(f"coding reward: language {language!r} is not supported (supported: ['python'])")
    task = _parse_label(sample.label)
    plans = plan_tests(task.tests, task.entry, task.entry_point)
    timeout_s = float(timeout_s)
    per_case_cpu = int(cpu_s) if cpu_s is not None else math.ceil(timeout_s) + 1
    # The CPU limit is a backstop one second past the wall-clock timeout: equal limits race on a spinning case
    # (seen: a full test run reported "crash" (SIGXCPU) where the wall clock should report "timeout").
    solution_limits = SandboxLimits(wall_s=1.0, cpu_s=per_case_cpu, memory_mb=memory_mb,
                                    max_processes=max_processes, max_file_mb=max_file_mb)
    judge_limits = SandboxLimits(
        wall_s=len(task.tests) * (timeout_s + 0.5) + 5.0, cpu_s=len(task.tests) * per_case_cpu + 5,
        memory_mb=memory_mb, max_processes=4, max_file_mb=max_file_mb, max_output_bytes=max_output_bytes)
    judge_task = {"tests": task.tests, "entry": task.entry, "entry_point": task.entry_point,
                  "names": [p.solution_names for p in plans], "timeout_s": timeout_s,
                  "max_message_bytes": _MAX_MESSAGE_BYTES}
    iso = isolation()
    # Between tests the server kills every process it may signal: safe alone in a pid namespace or under a private
    # uid; otherwise kill(-1) would hit every process of this user, so it kills the test's process group only.
    kill_mode = "group" if iso.mode == "none" and not iso.private_uid else "kill-all"
    solution = Peer(
        files={"solution.py": extract_code(sample.response), "solution_server.py": _harness_file("solution_server.py"),
               "wire.py": _harness_file("wire.py")},
        argv=["{python}", "-I", "-S", "-B", "solution_server.py", kill_mode, str(_MAX_MESSAGE_BYTES)],
        limits=solution_limits, run_here=True)
    result = await asyncio.to_thread(
        run_sandboxed, {"judge.py": _harness_file("judge.py"), "wire.py": _harness_file("wire.py")},
        ["{python}", "-I", "-S", "-B", "judge.py"], judge_limits, stdin=json.dumps(judge_task).encode(),
        result_channel=True, peer=solution, run_here=True)
    cases = _collect(result, len(task.tests))
    unsupported = [(i, c["detail"]) for i, c in enumerate(cases) if c["status"] == "unsupported"]
    if unsupported:
        index, detail = unsupported[0]
        raise ValueError(f"coding reward: test {index} is not a supported shape: {detail}")
    passed = sum(c["status"] == "pass" for c in cases)
    timeouts = sum(c["status"] == "timeout" for c in cases)
    total = len(task.tests)
    fraction = passed / total
    score = float(passed == total) if all_or_nothing else fraction
    return RewardResult(
        score,
        {"pass_fraction": fraction, "passed": float(passed), "total": float(total), "timeouts": float(timeouts)},
        {"cases": cases, "stderr": result.stderr.decode("utf-8", "replace"),
         "stdout": result.stdout.decode("utf-8", "replace"), "output_truncated": any(result.truncated.values()),
         "isolation": result.isolation, "sandbox_uid": result.peer_uid, "judge_uid": result.uid,
         "wall_s": result.wall_s},
    )
