"""The same contract checks authors run (`python -m rewards check`), on every built-in and on bad plugins."""
from __future__ import annotations

import subprocess
import sys

import pytest

from rewards import load_reward, registered_rewards, reward_examples
from rewards.contract import run_contract_checks

P = "tests.rewards.plugins_misbehaving"


@pytest.mark.parametrize("name", registered_rewards())
def test_builtin_passes_contract(name):
    examples = reward_examples(name)
    assert examples, f"built-in reward {name!r} registers no examples for the contract checks"
    failures = [r for r in run_contract_checks(load_reward(name), examples) if not r.passed]
    assert not failures, failures


@pytest.mark.parametrize("plugin, failing_check", [
    ("blocks_loop", "does not block the event loop"),
    ("nondeterministic", "deterministic"),
    ("racy", "concurrency safe"),
    ("returns_garbage", "returns RewardResult"),
])
def test_bad_plugin_fails_the_right_check(plugin, failing_check):
    import importlib

    fn = getattr(importlib.import_module(P), plugin)
    from rewards.contract import DEFAULT_EXAMPLES

    results = {r.name: r for r in run_contract_checks(fn, DEFAULT_EXAMPLES[:2], timeout_s=5)}
    assert failing_check in results and not results[failing_check].passed, results


def test_sync_function_fails_signature():
    from tests.rewards.plugins_misbehaving import sync_reward

    [result] = run_contract_checks(sync_reward)
    assert result.name == "signature" and not result.passed


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rewards", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_new_then_check_then_try(tmp_path):
    made = _cli("new", "my_plugin", "--dir", str(tmp_path), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    checked = _cli("check", str(tmp_path / "my_plugin.py"), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("[PASS]") == 6
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(tmp_path / "test_my_plugin.py")], cwd=tmp_path, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout
    sample = tmp_path / "sample.json"
    sample.write_text('{"prompt": "q", "response": "hi there", "label": null}')
    tried = _cli("try", str(tmp_path / "my_plugin.py"), "--sample", str(sample), "--kwargs", '{"target": "hi"}',
                 cwd=tmp_path)
    assert tried.returncode == 0 and "score: 1" in tried.stdout and "contains_target: 1" in tried.stdout


def test_check_reports_failure_with_exit_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import random\nfrom rewards import RewardResult\n"
                   "async def reward(sample):\n    return RewardResult(random.random())\n")
    result = _cli("check", str(bad), cwd=tmp_path)
    assert result.returncode == 1 and "[FAIL] deterministic" in result.stdout
