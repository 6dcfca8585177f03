"""Authoring tools for reward plugins.

    python -m rewards new NAME [--dir DIR]          write a plugin skeleton and its test
    python -m rewards check NAME_OR_PATH            run the contract checks and the hacking probe (exit 1 on failure)
    python -m rewards try NAME_OR_PATH --sample F   score one sample (JSON file) and print the breakdown
    python -m rewards list                          registered rewards

NAME_OR_PATH is a registered name, 'module:function', or 'path/to/file.py[:function]' (default function: reward).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

from rewards.api import RewardInput
from rewards.contract import format_report, run_contract_checks
from rewards.registry import load_reward, registered_rewards, reward_examples

_SKELETON = '''"""{name}: a slipstream reward plugin. Check it with `python -m rewards check {path}`."""
from rewards import RewardInput, RewardResult


async def reward(sample: RewardInput, *, target: str = "") -> RewardResult:
    """Scores one sample. Keep it deterministic; put blocking work in asyncio.to_thread."""
    hit = float(bool(target) and target in sample.response)
    return RewardResult(hit, components={{"contains_target": hit}}, info={{"target": target}})


EXAMPLES = [
    RewardInput(prompt=[{{"role": "user", "content": "Say hi"}}], response="hi there", label=None),
]
'''

_TEST = '''import asyncio

from rewards import RewardInput
from rewards.contract import run_contract_checks

from {module} import EXAMPLES, reward


def test_scores_target():
    result = asyncio.run(reward(RewardInput(prompt="p", response="say hi"), target="hi"))
    assert result.score == 1.0


def test_contract():
    failures = [r for r in run_contract_checks(reward, EXAMPLES) if not r.passed]
    assert not failures, failures
'''


def _examples_for(target: str) -> list[RewardInput] | None:
    examples = reward_examples(target)
    if examples:
        return examples
    path, _, _ = target.partition(":") if not target.endswith(".py") else (target, "", "")
    if path.endswith(".py") and Path(path).is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("slipstream_reward_examples", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return list(getattr(module, "EXAMPLES", []) or []) or None
    return None


def cmd_new(args) -> int:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", args.name):
        print(f"name {args.name!r} must be a lowercase Python identifier", file=sys.stderr)
        return 2
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    plugin, test = out / f"{args.name}.py", out / f"test_{args.name}.py"
    for path in (plugin, test):
        if path.exists():
            print(f"{path} exists; not overwriting", file=sys.stderr)
            return 2
    plugin.write_text(_SKELETON.format(name=args.name, path=plugin))
    test.write_text(_TEST.format(module=args.name))
    print(f"wrote {plugin} and {test}\nnext: python -m rewards check {plugin}")
    return 0


def cmd_check(args) -> int:
    fn = load_reward(args.target, json.loads(args.kwargs))
    results = run_contract_checks(fn, _examples_for(args.target), timeout_s=args.timeout)
    print(format_report(args.target, results))
    return 0 if all(r.passed for r in results) else 1


def _read_sample(path: str) -> RewardInput:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "response" not in data:
        raise SystemExit(f"{path}: a sample is a JSON object with 'response' (and 'prompt', 'label', 'metadata')")
    unknown = set(data) - {"prompt", "response", "label", "metadata"}
    if unknown:
        raise SystemExit(f"{path}: unknown field(s) {sorted(unknown)}")
    return RewardInput(prompt=data.get("prompt"), response=data["response"], label=data.get("label"),
                       metadata=data.get("metadata") or {})


def cmd_try(args) -> int:
    fn = load_reward(args.target, json.loads(args.kwargs))
    result = asyncio.run(fn(_read_sample(args.sample)))
    print(f"score: {result.score:.6g}")
    for key, value in sorted(result.components.items()):
        print(f"  {key}: {value:.6g}")
    if result.info:
        print("info: " + json.dumps(result.info, indent=2, default=repr))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("new", help="write a plugin skeleton and its test")
    p.add_argument("name")
    p.add_argument("--dir", default=".")
    p.set_defaults(func=cmd_new)
    for name, func in (("check", cmd_check), ("try", cmd_try)):
        p = sub.add_parser(name)
        p.add_argument("target")
        p.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the reward")
        if name == "check":
            p.add_argument("--timeout", type=float, default=30.0)
        else:
            p.add_argument("--sample", required=True)
        p.set_defaults(func=func)
    p = sub.add_parser("list")
    p.set_defaults(func=lambda a: print("\n".join(registered_rewards())) or 0)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
