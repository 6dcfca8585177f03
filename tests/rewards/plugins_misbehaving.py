"""Plugins that misbehave on purpose, for the runner's isolation tests."""
import asyncio
import random

from rewards import RewardInput, RewardResult

IN_FLIGHT = {"now": 0, "peak": 0}
CALLS: list[str] = []


async def constant(sample: RewardInput) -> RewardResult:
    return RewardResult(0.25)


async def raises(sample: RewardInput) -> RewardResult:
    raise RuntimeError("plugin bug")


async def hangs(sample: RewardInput) -> RewardResult:
    await asyncio.sleep(3600)
    return RewardResult(1.0)


async def returns_garbage(sample: RewardInput):
    return {"score": 1.0}


async def tracks_concurrency(sample: RewardInput) -> RewardResult:
    IN_FLIGHT["now"] += 1
    IN_FLIGHT["peak"] = max(IN_FLIGHT["peak"], IN_FLIGHT["now"])
    await asyncio.sleep(0.01)
    IN_FLIGHT["now"] -= 1
    return RewardResult(1.0)


async def counts_calls(sample: RewardInput) -> RewardResult:
    CALLS.append(sample.response)
    return RewardResult(float(len(sample.response)))


async def sometimes_slow(sample: RewardInput) -> RewardResult:
    await asyncio.sleep(0.2 if random.random() < 0.3 else 0.0)
    return RewardResult(1.0)


async def sometimes_raises(sample: RewardInput) -> RewardResult:
    if random.random() < 0.3:
        raise ValueError("flaky")
    return RewardResult(0.0)


def sync_reward(sample):
    return RewardResult(1.0)


async def blocks_loop(sample: RewardInput) -> RewardResult:
    import time

    time.sleep(1.0)
    return RewardResult(1.0)


async def nondeterministic(sample: RewardInput) -> RewardResult:
    return RewardResult(random.random())


_SHARED = {"value": 0.0}


async def racy(sample: RewardInput) -> RewardResult:
    _SHARED["value"] = float(len(sample.response))
    await asyncio.sleep(0.001)
    return RewardResult(_SHARED["value"])


async def pays_any_mention(sample: RewardInput) -> RewardResult:
    """Pays a response that mentions the label anywhere: every list of candidates collects it."""
    return RewardResult(float(str(sample.label).lower() in sample.response.lower()))


async def naive_coding(sample: RewardInput) -> RewardResult:
    """The classic gameable harness: the solution and the tests in one process (in the real sandbox), passed when
    that process exits with status 0."""
    from rewards.sandbox import SandboxLimits, run_sandboxed

    program = sample.response + "\n" + "\n".join(sample.label["tests"]) + "\n"
    result = await asyncio.to_thread(run_sandboxed, {"main.py": program}, ["{python}", "-I", "-S", "main.py"],
                                     SandboxLimits(wall_s=10.0))
    return RewardResult(float(result.returncode == 0))
