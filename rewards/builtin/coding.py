"""The `coding` reward: run the response's code against the task's unit tests in the local sandbox.

Label format: {"tests": ["assert add(1, 2) == 3", ...], "entry": "optional setup code run before each test"}, or
just the list of tests. Each test runs independently: a fresh fork of the sandboxed harness executes the solution,
the entry code and that one test; a test passes when it finishes without an exception. Score = passed / total, or
1/0 with `all_or_nothing`.

Results travel on a dedicated pipe (fd 3) that the solution's processes do not hold, tagged with a random per-run
nonce, from a harness process that is not ptrace-able by the solution; so printing fake markers, exiting early
(`sys.exit(0)`, `os._exit(0)`) or killing the harness does not pass a test. (Code that introspects its own process,
e.g. returning objects whose `__eq__` is always true, is a property of assert-based tests, not of the sandbox.)
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from rewards.api import RewardInput, RewardResult
from rewards.registry import register_reward
from rewards.sandbox import SandboxLimits, SandboxResult, run_sandboxed

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The last ```python fenced block of the response, else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


# The harness runs inside the sandbox (as the sandbox's first process). It must not trust anything the solution does.
_PY_HARNESS = r'''
import ctypes, json, os, select, signal, sys, time

def run_case(solution, entry, test, index, timeout):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = "crash:no outcome"
        try:
            os.close(r)
            os.close(3)
            os.setpgid(0, 0)
            ns = {"__name__": "solution", "__builtins__": __builtins__}
            exec(compile(solution, "solution.py", "exec"), ns)
            if entry:
                exec(compile(entry, "entry.py", "exec"), ns)
            exec(compile(test, "test_%d.py" % index, "exec"), ns)
            outcome = "pass:"
        except AssertionError as exc:
            outcome = "fail:AssertionError: %s" % (exc,)
        except BaseException as exc:
            outcome = "error:%s: %s" % (type(exc).__name__, exc)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        try:
            os.write(w, outcome.encode("utf-8", "replace")[:2000])
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    data, status, timed_out = b"", None, False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([r], [], [], min(left, 0.02))
        if ready:
            chunk = os.read(r, 4096)
            if len(data) < 4096:
                data += chunk
    os.set_blocking(r, False)
    try:
        data += os.read(r, 4096)
    except OSError:
        pass
    os.close(r)
    # Kill whatever the case left behind: its process group, and (as the pid namespace's init) everything else.
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    if os.getpid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    while True:
        try:
            if os.waitpid(-1, 0)[0] == 0:
                break
        except ChildProcessError:
            break
    if timed_out:
        return "timeout", "no result within %.3g s" % timeout
    text = data.decode("utf-8", "replace")
    kind, _, detail = text.partition(":")
    if kind in ("pass", "fail", "error") and status == 0:
        return kind, detail
    if os.WIFSIGNALED(status):
        return "crash", "killed by signal %d" % os.WTERMSIG(status)
    return "crash", "exited with status %d without a result" % os.waitstatus_to_exitcode(status)

def main():
    nonce = sys.stdin.readline().strip()
    with open("cases.json") as fh:
        spec = json.load(fh)
    with open("solution.py") as fh:
        solution = fh.read()
    try:  # not ptrace-able (nor /proc/1/mem, /proc/1/fd) by the solution's processes, which share our uid
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass
    out = os.fdopen(3, "w", buffering=1)
    for index, test in enumerate(spec["tests"]):
        status, detail = run_case(solution, spec["entry"], test, index, spec["timeout_s"])
        out.write(json.dumps([nonce, index, status, detail[:500]]) + "\n")
    out.close()

main()
'''


@dataclass(frozen=True)
class _Program:
    files: dict[str, str]
    argv: list[str]


def _python_program(code: str, tests: list[str], entry: str, timeout_s: float) -> _Program:
    cases = {"tests": tests, "entry": entry, "timeout_s": timeout_s}
    return _Program(
        files={"solution.py": code, "cases.json": json.dumps(cases), "_harness.py": _PY_HARNESS},
        argv=["{python}", "-I", "-S", "-B", "_harness.py"],
    )


# language -> builder(code, tests, entry, timeout_s). Every harness reports one JSON line per case on fd 3:
# [nonce, index, status, detail] with status in pass/fail/error/timeout/crash.
_LANGUAGES = {"python": _python_program}


def _parse_tests(label: Any) -> tuple[list[str], str]:
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except ValueError:
            raise ValueError("coding reward: label must be {'tests': [...], 'entry': ...} or a list of tests") from None
    if isinstance(label, (list, tuple)):
        tests, entry = list(label), ""
    elif isinstance(label, dict) and "tests" in label:
        tests, entry = label["tests"], label.get("entry") or ""
        tests = [tests] if isinstance(tests, str) else list(tests)
    else:
        raise ValueError("coding reward needs a label {'tests': [...], 'entry': optional code} on every sample")
    if not tests or not all(isinstance(t, str) for t in tests) or not isinstance(entry, str):
        raise ValueError("coding reward: 'tests' must be a non-empty list of code strings and 'entry' a string")
    return tests, entry


def _collect(result: SandboxResult, nonce: str, total: int) -> list[dict[str, str]]:
    cases: list[dict[str, str] | None] = [None] * total
    for line in result.results.decode("utf-8", "replace").splitlines():
        try:
            got_nonce, index, status, detail = json.loads(line)
        except (ValueError, TypeError):
            continue
        if got_nonce != nonce or not isinstance(index, int) or not 0 <= index < total or cases[index] is not None:
            continue
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
    builder = _LANGUAGES.get(language)
    if builder is None:
        raise ValueError(f"coding reward: language {language!r} is not supported (supported: {sorted(_LANGUAGES)})")
    tests, entry = _parse_tests(sample.label)
    code = extract_code(sample.response)
    program = builder(code, tests, entry, float(timeout_s))
    limits = SandboxLimits(
        wall_s=len(tests) * (float(timeout_s) + 0.5) + 5.0,
        # The CPU limit is a backstop one second past the wall-clock timeout: equal limits race on a spinning case
        # (seen: a full test run reported "crash" (SIGXCPU) where the wall clock should report "timeout").
        cpu_s=int(cpu_s) if cpu_s is not None else math.ceil(timeout_s) + 1,
        memory_mb=memory_mb, max_processes=max_processes, max_file_mb=max_file_mb,
        max_output_bytes=max_output_bytes)
    nonce = secrets.token_hex(16)
    result = await asyncio.to_thread(
        run_sandboxed, program.files, program.argv, limits, stdin=(nonce + "\n").encode(), result_channel=True)
    cases = _collect(result, nonce, len(tests))
    passed = sum(c["status"] == "pass" for c in cases)
    timeouts = sum(c["status"] == "timeout" for c in cases)
    fraction = passed / len(tests)
    score = float(passed == len(tests)) if all_or_nothing else fraction
    return RewardResult(
        score,
        {"pass_fraction": fraction, "passed": float(passed), "total": float(len(tests)), "timeouts": float(timeouts)},
        {"cases": cases, "stderr": result.stderr.decode("utf-8", "replace"),
         "stdout": result.stdout.decode("utf-8", "replace"), "output_truncated": any(result.truncated.values()),
         "isolation": result.isolation, "sandbox_uid": result.uid, "wall_s": result.wall_s},
    )
