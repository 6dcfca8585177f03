"""Load test for the reward runner: 10,000 calls through a mix of fast, slow (time out), failing and garbage
plugins, with timeouts and bounded concurrency. Prints throughput, timeouts/errors, and peak memory growth.

    python bench/reward_load.py [--calls 10000] [--concurrency 256] [--timeout 0.05]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import random
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards import RewardInput, RewardResult, RewardRunner, RewardSpec, RunnerSettings  # noqa: E402


async def fast(sample: RewardInput) -> RewardResult:
    return RewardResult(float(len(sample.response) % 2))


async def slow(sample: RewardInput) -> RewardResult:
    await asyncio.sleep(1.0 if random.random() < 0.2 else 0.001)
    return RewardResult(1.0)


async def failing(sample: RewardInput) -> RewardResult:
    if random.random() < 0.25:
        raise RuntimeError("flaky plugin")
    return RewardResult(0.5)


async def garbage(sample: RewardInput):
    return None if random.random() < 0.1 else RewardResult(0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=0.05)
    args = parser.parse_args()
    random.seed(0)
    module = "bench.reward_load" if __name__ != "__main__" else "__main__"
    specs = [RewardSpec(f"{module}:{n}") for n in ("fast", "slow", "failing", "garbage")]
    runner = RewardRunner(specs, RunnerSettings(timeout_s=args.timeout, max_concurrency=args.concurrency))
    samples = [RewardInput(prompt="p", response="x" * (i % 50)) for i in range(args.calls)]

    import logging
    logging.disable(logging.ERROR)  # thousands of expected plugin errors
    tracemalloc.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    results = asyncio.run(asyncio.wait_for(runner.score_many(samples), timeout=600))
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    gc.collect()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plugin_calls = args.calls * len(specs)
    print(f"samples: {len(results)} ({plugin_calls} plugin calls), concurrency {args.concurrency}, "
          f"timeout {args.timeout}s")
    print(f"wall {elapsed:.2f}s -> {len(results) / elapsed:.0f} samples/s, {plugin_calls / elapsed:.0f} plugin calls/s")
    print(f"stats: {runner.stats}")
    print(f"python heap peak during run: {peak / 2**20:.1f} MiB; max RSS {rss_before / 1024:.0f} -> "
          f"{rss_after / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
