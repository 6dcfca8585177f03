"""The `coding` reward: code extraction, scoring, configuration and honest results."""
from __future__ import annotations

import asyncio
import time

import pytest

from rewards import RewardInput, get_reward, load_reward, registered_rewards
from rewards.builtin.coding import extract_code

LABEL = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}
CORRECT = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"


def score(response, label=LABEL, **kwargs):
    kwargs.setdefault("timeout_s", 1.0)
    return asyncio.run(get_reward("coding")(RewardInput("p", response, label), **kwargs))


def test_registered():
    assert "coding" in registered_rewards()


def test_correct_and_incorrect_solutions_get_1_and_0():
    good, bad = score(CORRECT), score(WRONG)
    assert good.score == 1.0 and good.components == {"pass_fraction": 1.0, "passed": 3.0, "total": 3.0, "timeouts": 0.0}
    assert bad.score == 0.0 and bad.components["passed"] == 0.0
    assert [c["status"] for c in bad.info["cases"]] == ["fail"] * 3


def test_partial_credit_and_all_or_nothing():
    partial = "def add(a, b):\n    return 4 if a == 2 else 0\n"  # fails add(1, 2) == 3, passes the other two
    result = score(partial)
    assert [c["status"] for c in result.info["cases"]] == ["fail", "pass", "pass"]
    assert result.score == pytest.approx(2 / 3) and result.components["passed"] == 2.0
    assert score(partial, all_or_nothing=True).score == 0.0
    assert score(CORRECT, all_or_nothing=True).score == 1.0


def test_cases_are_independent_and_one_timeout_does_not_sink_the_rest():
    code = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b\n"
    result = score(code)
    assert [c["status"] for c in result.info["cases"]] == ["pass", "pass", "timeout"]
    assert result.score == pytest.approx(2 / 3) and result.components["timeouts"] == 1.0
    # state does not leak between cases
    label = {"tests": ["STATE.append(1); assert STATE == [1]", "STATE.append(1); assert STATE == [1]"]}
    assert score("STATE = []\n", label).score == 1.0


def test_entry_code_runs_before_each_test():
    label = {"tests": ["assert double(3) == 6"], "entry": "def double(x):\n    return add(x, x)\n"}
    assert score(CORRECT, label).score == 1.0
    assert score(CORRECT, ["assert add(0, 0) == 0"]).score == 1.0  # a bare list of tests


def test_forging_results_does_not_pass():
    forgers = [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        'print(\'["x", 0, "pass", ""]\')\nprint("pass:")\ndef add(a, b):\n    return None\n',
        "import os\ntry:\n    os.write(3, b'[\"x\", 0, \"pass\", \"\"]\\n' * 3)\nexcept OSError:\n    pass\n"
        "def add(a, b):\n    return None\n",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef add(a, b):\n    return None\n",
    ]
    for code in forgers:
        result = score(code)
        assert result.score == 0.0, (code, result.info["cases"])


def test_extract_code():
    assert extract_code(CORRECT) == "def add(a, b):\n    return a + b\n"
    two = "```python\nx = 1\n```\ntext\n```py\ny = 2\n```"
    assert extract_code(two) == "y = 2\n"
    assert extract_code("def f(): pass") == "def f(): pass"
    assert extract_code("```python\nunclosed = 1\n") == "unclosed = 1\n"


def test_syntax_error_scores_zero_with_detail():
    result = score("```python\ndef add(a, b) return a + b\n```")
    assert result.score == 0.0
    assert "SyntaxError" in result.info["cases"][0]["detail"]


def test_other_languages_are_a_clear_error():
    with pytest.raises(ValueError, match="'rust'"):
        score(CORRECT, language="rust")


def test_label_is_required_and_validated():
    for bad in (None, {}, {"tests": []}, {"tests": [1]}, "not json"):
        with pytest.raises(ValueError, match="coding reward"):
            score(CORRECT, bad)


def test_configuration_through_load_reward():
    fn = load_reward("coding", {"timeout_s": 2.0, "memory_mb": 512, "all_or_nothing": True, "max_output_bytes": 100})
    assert asyncio.run(fn(RewardInput("p", CORRECT, LABEL))).score == 1.0
    with pytest.raises(ValueError, match="does not take"):
        load_reward("coding", {"timeout": 2.0})


def test_stderr_is_reported_truncated():
    code = "import sys\nsys.stderr.write('E' * 50_000)\ndef add(a, b):\n    return a + b\n"
    result = score(code, ["assert add(1, 1) == 2"], max_output_bytes=300)
    assert result.score == 1.0
    assert result.info["stderr"] == "E" * 300 and result.info["output_truncated"]


def test_the_event_loop_is_not_blocked():
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        t0 = time.monotonic()
        results = await asyncio.gather(*(get_reward("coding")(
            RewardInput("p", "def add(a, b):\n    while True:\n        pass\n", ["assert add(1, 1) == 2"]),
            timeout_s=1.0) for _ in range(2)))
        elapsed = time.monotonic() - t0
        task.cancel()
        return results, ticks, elapsed

    results, ticks, elapsed = asyncio.run(main())
    assert [r.score for r in results] == [0.0, 0.0]
    assert ticks >= 0.5 * elapsed / 0.05  # the loop kept ticking while both sandboxes ran
