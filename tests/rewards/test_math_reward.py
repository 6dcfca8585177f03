"""The math reward: boxed / answer-phrase extraction and math-verify equivalence, on and off the main thread."""
from __future__ import annotations

import asyncio
import threading

import pytest

from rewards import RewardInput, load_reward
from rewards.builtin.math_answer import extract_answer, last_boxed, math_answer


def score(response, label, **kwargs):
    return asyncio.run(math_answer(RewardInput("Solve it.", response, label), **kwargs))


def test_registered():
    fn = load_reward("math", {"timeout_s": 3})
    assert asyncio.run(fn(RewardInput("p", r"\boxed{4}", "4"))).score == 1.0


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces
    (r"first \boxed{1} then \boxed{ {a}^{2} }", "{a}^{2}"),  # the last box wins
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are content
    (r"\boxed{5} and a truncated \boxed{\frac{1}{2", "5"),  # an unclosed last box falls back to the previous
    (r"\fbox{7}", "7"),
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_sources():
    assert extract_answer(r"The answer is $\frac{1}{2}$.") == (r"\frac{1}{2}", "answer_phrase")
    assert extract_answer("Work...\nFinal Answer: 0.5\n") == ("0.5", "answer_phrase")
    assert extract_answer(r"The answer is 3, i.e. \boxed{3}") == ("3", "boxed")
    assert extract_answer(r"<think>\boxed{9}</think>I could not finish.") == (None, "none")


@pytest.mark.parametrize("label, response", [
    (r"\frac{1}{2}", r"\boxed{0.5}"),
    ("0.5", r"\boxed{\frac{1}{2}}"),
    ("1/2", r"\boxed{\dfrac12}"),
    ("0.5", "The answer is 1/2."),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}"),
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}"),
    ("1000", r"\boxed{1,000}"),
    ("3", r"\boxed{x = 3}"),
    (r"\{1, 2, 3\}", r"\boxed{\{3, 2, 1\}}"),
    ("(1, 2]", r"\boxed{(1,2]}"),
    ("a+b", r"\boxed{b + a}"),
    (r"\text{Monday}", r"\boxed{\text{monday}}"),
    ({"answer": "42"}, r"Therefore \boxed{42}."),
])
def test_equivalent_answers_score_one(label, response):
    result = score(response, label)
    assert result.score == 1.0, result.info
    assert result.components == {"correct": 1.0, "has_answer": 1.0}


@pytest.mark.parametrize("label, response", [
    ("2", r"\boxed{3}"),
    (r"\frac{1}{2}", r"\boxed{0.51}"),
    ("(1, 2]", r"\boxed{[1, 2]}"),  # interval ends matter
    (r"\{1, 2\}", r"\boxed{\{1, 2, 3\}}"),
    ("x+y", r"\boxed{x-y}"),
    ("Monday", r"\boxed{Mondya}"),  # sympy would call this anagram equal (a product of symbols)
    ("7", r"<think>\boxed{7}</think>Final: \boxed{8}"),  # reasoning is not the answer
])
def test_wrong_answers_score_zero(label, response):
    result = score(response, label)
    assert result.score == 0.0 and result.components == {"correct": 0.0, "has_answer": 1.0}


def test_no_answer():
    result = score("I think it is probably 4 but I am not sure", "4")
    assert result.score == 0.0 and result.components == {"correct": 0.0, "has_answer": 0.0}
    assert result.info["reason"] == "no answer found"


def test_overlong_answer_is_not_verified():
    result = score(r"\boxed{" + "+".join(["x"] * 600) + "}", "1", max_answer_chars=1000)
    assert result.score == 0.0 and "max_answer_chars" in result.info["reason"]


def test_missing_label_is_an_error():
    with pytest.raises(ValueError, match="reference answer"):
        score(r"\boxed{1}", None)


def test_runs_off_the_main_thread():
    # math-verify's SIGALRM timeouts raise off the main thread; the reward must switch them off there
    out = {}

    def worker():
        try:
            out["result"] = score(r"\boxed{\frac{2}{4}}", "0.5")
        except Exception as exc:  # surfaced below with its message
            out["error"] = exc

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert out["result"].score == 1.0


def test_answer_phrase_stops_at_sentence_end():
    assert extract_answer("The answer is 0.5. Next we check it.") == ("0.5", "answer_phrase")
    assert score("So the answer is 12. Done.", "12").score == 1.0


def test_slow_verification_times_out_without_blocking(monkeypatch):
    import time

    import rewards.builtin.math_answer as mod

    monkeypatch.setattr(mod, "answers_equivalent", lambda gold, answer: time.sleep(2) or True)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        result = await math_answer(RewardInput("q", r"\boxed{1}", "1"), timeout_s=0.3)
        task.cancel()
        return result, ticks

    started = time.monotonic()
    result, ticks = asyncio.run(main())
    assert time.monotonic() - started < 1.5  # neither the call nor asyncio.run's shutdown waits for the thread
    assert result.score == 0.0 and "timed out" in result.info["reason"]
    assert ticks >= 10  # the event loop kept running while sympy "worked"
