"""What the built-in environments share: deterministic task generation with a held-out split, and strict final
answers."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from typing import Callable

from rewards.builtin.math_answer import extract_answer
from rewards.envs.api import Task

HELDOUT_FRACTION = 0.2
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def split_of(key: str) -> str:
    """A task's split from its content alone, so the same task never lands in both splits whatever the seed."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
    return "heldout" if bucket < HELDOUT_FRACTION else "train"


def prompt_bucket(task: Task) -> float:
    """A number in [0, 1) from the task's last prompt message alone: which tasks a generator's demonstrations
    cover, the same on every machine and for every seed (a task with the same prompt falls in the same bucket)."""
    return hashlib.sha256(task.prompt[-1]["content"].encode()).digest()[0] / 256


def draw_tasks(env: str, split: str, count: int, seed: int,
               candidate: Callable[[random.Random], tuple[str, Callable[[str], Task]]]) -> list[Task]:
    """`count` distinct tasks of `split`: candidates (split key, builder taking the task id) are drawn from a
    generator seeded by (env, split, seed) until enough fall in the split. The split key is what must never be
    shared across splits (a problem), distinctness is over the whole task (a problem with other test inputs is
    another task)."""
    rng = random.Random(f"{env}/{split}/{seed}")
    tasks, seen = [], set()
    for _ in range(1000 * max(count, 1)):
        if len(tasks) == count:
            return tasks
        key, build = candidate(rng)
        if split_of(f"{env}/{key}") != split:
            continue
        task = dataclasses.replace(build(f"{env}/{split}/{seed}/{len(tasks)}"), split=split)
        content = json.dumps([task.prompt, task.data], sort_keys=True)
        if content not in seen:
            seen.add(content)
            tasks.append(task)
    raise ValueError(f"{env}: only {len(tasks)} distinct {split} tasks could be drawn, {count} asked")


def final_number(text: str) -> float | None:
    """The final answer ("Answer: 42" or \\boxed{42}, reasoning ignored, the last one counts) when it is exactly
    one number; None for no answer, a hedge ("42 or 43") or anything that is not a plain number."""
    answer, _ = extract_answer(text)
    if answer is None:
        return None
    answer = answer.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", answer) else answer
    if not _NUMBER_RE.fullmatch(answer.strip()):
        return None
    return float(answer)


def numbers_match(expected: float, got: float | None, rel: float = 1e-6) -> bool:
    return got is not None and abs(expected - got) <= rel * max(1.0, abs(expected))
