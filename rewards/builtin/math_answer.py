"""Math reward: 1 when the response's final answer is mathematically equivalent to the reference, else 0.

Label: the reference answer as a string (LaTeX or plain: "\\frac{1}{2}", "0.5", "\\{1, 2\\}", "(1, 2]") or
{"answer": ...}. The response's answer is the contents of its last \\boxed{...} (braces balanced, so
\\boxed{\\frac{1}{2}} works), else what follows the last "answer is" / "answer:", else there is none (score 0,
info says so). Reasoning inside <think>...</think> is ignored.

Equivalence is math-verify's (numbers, fractions vs decimals, LaTeX, sets, intervals, equations "x = 3" vs
"3", symbolic simplification). Word answers ("\\text{Monday}") are compared as words, since sympy would read
them as products of symbols; when math-verify parses neither side, the strings must match up to LaTeX spacing.

Time limits and the event loop: sympy work is CPU-bound, so it runs in a daemon thread while the event loop
stays free (the reward contract). math-verify's own time limit uses SIGALRM, which only works on the main thread,
so it is switched off; instead the reward stops waiting after `timeout_s` and scores 0 (info says "timed out").
Python cannot kill a thread, so a pathological sympy call runs on in the background until it returns; it is a
daemon thread, so it never holds up shutdown, and `max_answer_chars` keeps such inputs rare.
Components: {"correct", "has_answer"}.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
from typing import Any

from rewards.api import RewardInput, RewardResult
from rewards.registry import register_reward
from rewards.text_normalize import last_boxed, strip_reasoning

# "The answer is 42. Next..." -> "42": up to a sentence-ending period (not a decimal point) or the line end.
_ANSWER_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+?)\s*(?=\.(?:\s|$)|\n|$)",
                        re.IGNORECASE)


def extract_answer(response: str) -> tuple[str | None, str]:
    """(answer, how it was found): "boxed", "answer_phrase" or "none"."""
    text = strip_reasoning(response)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    matches = _ANSWER_RE.findall(text)
    if matches:
        answer = matches[-1].strip()
        answer = answer.strip("$ ").rstrip(".").strip().strip("$ ")  # "$\frac12$." -> "\frac12"
        if answer:
            return answer, "answer_phrase"
    return None, "none"


def _label_answer(label: Any) -> str:
    if isinstance(label, dict):
        label = label.get("answer")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise ValueError("math needs a reference answer on every sample: a string or {'answer': ...}")
    return str(label).strip()


def _strip_outer_dollars(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text[1:-1].strip()
    return text


class _SilenceTimeoutWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; that is deliberate here (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_SilenceTimeoutWarning())


def _math_verify_equal(gold: str, answer: str) -> bool | None:
    """True/False from math-verify; None when it could parse neither side as math (then strings decide)."""
    from math_verify import parse, verify  # imported lazily (in the worker thread): sympy + antlr take ~0.6 s

    gold_parsed = parse(f"${_strip_outer_dollars(gold)}$", parsing_timeout=None)
    answer_parsed = parse(f"${_strip_outer_dollars(answer)}$", parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return None
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_WORDS_RE = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_LATEX_SPACING_RE = re.compile(r"\\left|\\right|\\[,;:!]|\\quad|\s+")


def _unwrap_text(answer: str) -> str:
    return " ".join(_TEXT_RE.sub(r"\1", _strip_outer_dollars(answer)).split())


def answers_equivalent(gold: str, answer: str) -> bool:
    """Blocking (sympy): call it off the event loop, as `math_answer` does."""
    gold_words, answer_words = _unwrap_text(gold), _unwrap_text(answer)
    if _WORDS_RE.fullmatch(gold_words) and _WORDS_RE.fullmatch(answer_words):
        # Word answers ("Monday") are compared as words: sympy would read them as products of symbols, under
        # which any anagram is "equal". Single letters stay case-sensitive (x vs X can differ in math).
        if len(gold_words) == 1 or len(answer_words) == 1:
            return gold_words == answer_words
        return gold_words.lower() == answer_words.lower()
    verdict = _math_verify_equal(gold, answer)
    if verdict is None:  # neither side parses as math: identical up to LaTeX spacing is the best we can say
        compact_gold, compact_answer = (_LATEX_SPACING_RE.sub("", x) for x in (gold_words, answer_words))
        return bool(compact_gold) and compact_gold == compact_answer
    return verdict


async def _in_daemon_thread(fn, *args):
    """fn(*args) in a fresh daemon thread. Not asyncio.to_thread: the default executor's threads are joined when
    the loop (asyncio.run) and the interpreter shut down, so one stuck sympy call would hang both."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(result, error):
        if not future.done():  # the waiter may have timed out and cancelled it
            future.set_exception(error) if error is not None else future.set_result(result)

    def work():
        try:
            result, error = fn(*args), None
        except Exception as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
            pass

    threading.Thread(target=work, daemon=True, name="math-verify").start()
    return await future


@register_reward("math", examples=[
    RewardInput("Compute 1/2 as a decimal.", r"So it is \boxed{0.5}", label=r"\frac{1}{2}"),
    RewardInput("What is 2 + 3?", "The answer is 6.", label="5"),
    RewardInput("What is 2 + 3?", "I do not know.", label="5"),
])
async def math_answer(sample: RewardInput, *, timeout_s: float = 10.0,
                      max_answer_chars: int = 1000) -> RewardResult:
    """1 if the final (boxed) answer is equivalent to the label, else 0."""
    gold = _label_answer(sample.label)
    answer, source = extract_answer(sample.response)
    if answer is None:
        return RewardResult(0.0, {"correct": 0.0, "has_answer": 0.0}, {"reason": "no answer found"})
    info: dict[str, Any] = {"answer": answer[:200], "source": source}
    if len(answer) > max_answer_chars or len(gold) > max_answer_chars:
        info["reason"] = f"answer longer than max_answer_chars={max_answer_chars}; not verified"
        return RewardResult(0.0, {"correct": 0.0, "has_answer": 1.0}, info)
    try:
        correct = await asyncio.wait_for(_in_daemon_thread(answers_equivalent, gold, answer), timeout_s)
    except asyncio.TimeoutError:
        info["reason"] = f"verification timed out after {timeout_s}s"
        return RewardResult(0.0, {"correct": 0.0, "has_answer": 1.0}, info)
    return RewardResult(float(correct), {"correct": float(correct), "has_answer": 1.0}, info)
