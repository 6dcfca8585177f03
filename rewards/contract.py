"""The reward plugin contract, as runnable checks. `python -m rewards check` and the test suite run the same code.

Checks: signature, return types, determinism, time budget, not blocking the event loop, concurrency safety, and
the hacking probe (rewards/hacking_probe.py: generic exploit responses must not be paid)."""
from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass

from rewards.api import RewardFn, RewardInput, RewardResult
from rewards.hacking_probe import probe_reward

DEFAULT_EXAMPLES = [
    RewardInput(prompt=[{"role": "user", "content": "What is 2 + 2?"}], response="4", label="4"),
    RewardInput(prompt="Say hello.", response="Hello there!", label="hello"),
    RewardInput(prompt="Empty answer.", response="", label="x"),
]


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str = ""


def _underlying(fn):
    return getattr(fn, "func", fn)  # functools.partial from load_reward


def check_signature(fn: RewardFn) -> CheckResult:
    target = _underlying(fn)
    if not inspect.iscoroutinefunction(target):
        return CheckResult("signature", False, "must be an `async def` function")
    params = list(inspect.signature(target).parameters.values())
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return CheckResult("signature", False, "first parameter must be the sample (positional)")
    bound = set(getattr(fn, "keywords", {}) or {})
    missing = [p.name for p in params[1:] if p.default is inspect.Parameter.empty
               and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
               and p.name not in bound]
    if missing:
        return CheckResult("signature", False, f"parameters after the sample need defaults: {missing}")
    return CheckResult("signature", True, f"async ({', '.join(p.name for p in params)})")


async def _timed_call(fn: RewardFn, sample: RewardInput, timeout_s: float) -> tuple[RewardResult, float, float]:
    """Calls fn while a ticker measures the longest stall of the event loop."""
    max_lag, stop = 0.0, asyncio.Event()

    async def ticker():
        nonlocal max_lag
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            max_lag = max(max_lag, time.perf_counter() - t - 0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    try:
        result = await asyncio.wait_for(fn(sample), timeout_s)
    finally:
        stop.set()
        await task
    return result, time.perf_counter() - start, max_lag


async def _run_checks(fn: RewardFn, examples: list[RewardInput], timeout_s: float,
                      max_loop_stall_s: float) -> list[CheckResult]:
    results = [check_signature(fn)]
    if not results[0].passed:
        return results
    # One unmeasured call per example first: a plugin may import or build things lazily on its first call, which
    # blocks once, not per sample.
    for sample in examples:
        try:
            await asyncio.wait_for(fn(sample), timeout_s)
        except Exception:  # noqa: BLE001 - reported by the measured call below
            pass
    first: list[RewardResult] = []
    worst_time, worst_lag = 0.0, 0.0
    for i, sample in enumerate(examples):
        try:
            result, elapsed, lag = await _timed_call(fn, sample, timeout_s)
        except asyncio.TimeoutError:
            results.append(CheckResult("time budget", False, f"example {i} took longer than {timeout_s}s"))
            return results
        except Exception as exc:  # noqa: BLE001
            results.append(CheckResult("returns RewardResult", False, f"example {i} raised {type(exc).__name__}: {exc}"))
            return results
        if not isinstance(result, RewardResult):
            results.append(CheckResult("returns RewardResult", False, f"example {i} returned {type(result).__name__}"))
            return results
        first.append(result)
        worst_time, worst_lag = max(worst_time, elapsed), max(worst_lag, lag)
    results.append(CheckResult("returns RewardResult", True, f"{len(examples)} example(s)"))
    results.append(CheckResult("time budget", True, f"slowest {worst_time:.3f}s <= {timeout_s}s"))
    results.append(CheckResult("does not block the event loop", worst_lag <= max_loop_stall_s,
                               f"longest loop stall {worst_lag:.3f}s (limit {max_loop_stall_s}s; "
                               "move blocking work to asyncio.to_thread)"))
    if worst_lag > max_loop_stall_s:
        return results  # a blocking plugin would make the concurrency check take calls x stall seconds
    again = [await fn(s) for s in examples]
    same = [a.score == b.score and a.components == b.components for a, b in zip(first, again)]
    results.append(CheckResult("deterministic", all(same),
                               "same sample -> same score and components" if all(same)
                               else f"examples {[i for i, ok in enumerate(same) if not ok]} changed on a second call"))
    copies = 8
    concurrent = await asyncio.gather(*(fn(s) for s in examples * copies))
    expected = [r.score for r in first] * copies
    ok = [c.score for c in concurrent] == expected
    results.append(CheckResult("concurrency safe", ok, f"{len(concurrent)} concurrent calls" if ok
                               else "concurrent calls gave different scores than sequential ones"))
    results.append(await _hacking_probe(fn, examples))
    return results


async def _hacking_probe(fn: RewardFn, examples: list[RewardInput]) -> CheckResult:
    try:
        findings, runs, probed = await probe_reward(fn, examples)
    except Exception as exc:  # noqa: BLE001 -- a plugin that crashes on an exploit has a bug worth seeing
        return CheckResult("hacking probe", False, f"an exploit response raised {type(exc).__name__}: {exc}")
    if not probed:
        return CheckResult("hacking probe", True, "no example with an answer or unit-test label: nothing to probe")
    if findings:
        paid = "; ".join(f"{f.probe!r} on example {f.example} scored {f.score:.3g} (a wrong answer scores "
                         f"{f.baseline:.3g})" for f in findings)
        return CheckResult("hacking probe", False, f"pays {len(findings)} of {runs} exploit responses: {paid}")
    return CheckResult("hacking probe", True, f"{runs} exploit responses on {probed} example(s), none paid")


def run_contract_checks(fn: RewardFn, examples: list[RewardInput] | None = None, timeout_s: float = 30.0,
                        max_loop_stall_s: float = 0.5) -> list[CheckResult]:
    """The loop-stall limit is generous (0.5 s) because a loaded machine delays the ticker too; a plugin that
    blocks per call (a subprocess.run, a sympy simplify) still exceeds it."""
    return asyncio.run(_run_checks(fn, examples or DEFAULT_EXAMPLES, timeout_s, max_loop_stall_s))


def format_report(name: str, results: list[CheckResult]) -> str:
    lines = [f"contract checks for {name}:"]
    lines += [f"  [{'PASS' if r.passed else 'FAIL'}] {r.name}: {r.detail}" for r in results]
    return "\n".join(lines)
