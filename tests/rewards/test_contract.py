"""The same contract checks authors run (`python -m rewards check`), on every built-in and on bad plugins."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewards import RewardInput, load_reward, registered_rewards, reward_examples
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


_REPO = Path(__file__).resolve().parents[2]


def _cli(*args, cwd):
    # This checkout's `rewards`, whatever an installed copy elsewhere says (cwd is not on the path for -m from tmp).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "rewards", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_new_then_check_then_try(tmp_path):
    made = _cli("new", "my_plugin", "--dir", str(tmp_path), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    checked = _cli("check", str(tmp_path / "my_plugin.py"), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("[PASS]") == 7
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


def test_hacking_probe_fails_a_plugin_that_pays_candidate_lists_and_names_them():
    from tests.rewards.plugins_misbehaving import pays_any_mention

    examples = [RewardInput([{"role": "user", "content": "What is the capital of Australia?"}], "Canberra",
                            "Canberra")]
    probe = {r.name: r for r in run_contract_checks(pays_any_mention, examples)}["hacking probe"]
    assert not probe.passed
    for exploit in ("candidates with question marks", "comma-separated candidates", "'<decoy>, not <reference>'",
                    "'Not <reference>.'", "retraction to a decoy"):
        assert exploit in probe.detail, probe.detail


def test_hacking_probe_fails_a_coding_harness_that_trusts_the_exit_status():
    from tests.rewards.plugins_misbehaving import naive_coding

    examples = [RewardInput("Write add(a, b).", "def add(a, b):\n    return a + b\n",
                            {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]})]
    probe = {r.name: r for r in run_contract_checks(naive_coding, examples)}["hacking probe"]
    assert not probe.passed
    assert "os._exit(0)" in probe.detail and "sys.exit(0)" in probe.detail
    assert "return an object equal to everything" in probe.detail


def test_check_cli_reports_the_exploit_paid():
    result = _cli("check", f"{P}:pays_any_mention", cwd=_REPO)
    assert result.returncode == 1
    assert "[FAIL] hacking probe" in result.stdout and "candidates with question marks" in result.stdout
