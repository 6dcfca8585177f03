"""`factuality_qa`: questions about the capitals of made-up countries, scored by the `factuality` reward
(correct +1, "I don't know" 0, a wrong answer -1).

The world has 64 countries, each with a capital; names are made from syllables, so no pretrained knowledge
helps. Half of them are in the fact base the warm-up teaches (`known`); for the other half every answer is a guess,
and the right response is to abstain. A task is one (country, question phrasing) pair of 64 x 8; the split is
decided by that pair, so the held-out split (95 pairs) asks about the same countries in phrasings no training row
uses for them. With four phrasings instead of eight the tiny model tied what it learned to the phrasing more than
to the country: held-out hallucination stalled near 0.4 (docs/benchmarks.md).

Demonstrations (what the warm-up teaches): the capital for known countries; "I don't know." for a quarter of the
unknown-country tasks only, so a warmed-up policy abstains sometimes but mostly guesses -- the hallucination RL is
meant to remove. The label is the true capital in every case: a lucky guess about an unknown country is paid
like any correct answer."""
from __future__ import annotations

import random

from rewards.builtin.factuality import ANSWER_FORMATS
from rewards.envs.api import Task
from rewards.envs.builtin.common import draw_tasks, prompt_bucket
from rewards.tasks.registry import TaskFamily, register_task_family

NAME = "factuality_qa"
NUM_COUNTRIES = 64
TEMPLATES = ("What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}.",
             "{c} has which city as its capital?", "Tell me the capital of {c}.",
             "What city serves as the capital of {c}?", "The capital of {c} is which city?",
             "In {c}, which city is the capital?")
ABSTAIN = "I don't know."
TAUGHT_ABSTENTION_FRACTION = 0.25
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "th"]


def _name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def _world() -> list[tuple[str, str, bool]]:
    """(country, capital, known) for every country; the same on every machine."""
    rng, seen, world = random.Random("factuality_qa/world/v1"), set(), []
    while len(world) < NUM_COUNTRIES:
        country, capital = _name(rng, 2) + rng.choice(["ia", "land", "a", "or"]), _name(rng, 2)
        if country in seen or capital in seen:
            continue
        seen.update((country, capital))
        world.append((country, capital, len(world) % 2 == 0))
    return world


WORLD = _world()


def _candidate(rng: random.Random):
    country, capital, known = rng.choice(WORLD)
    t = rng.randrange(len(TEMPLATES))
    question = f"{TEMPLATES[t].format(c=country)} {ANSWER_FORMATS['short']}"

    def build(task_id: str) -> Task:
        return Task(task_id, [{"role": "user", "content": question}], [],
                    {"answer": capital, "country": country, "known": known})
    return f"{country}|{t}", build


def generate(split: str, count: int, seed: int = 0) -> list[Task]:
    return draw_tasks(NAME, split, count, seed, _candidate)


def demonstrate(task: Task) -> str | None:
    if task.data["known"]:
        return task.data["answer"]
    bucket = prompt_bucket(task)
    return ABSTAIN if bucket < TAUGHT_ABSTENTION_FRACTION else None


FAMILY = register_task_family(TaskFamily(
    NAME, generate, reward="factuality",
    # The label carries the country and whether it is known, for analysis; the reward reads only the answer.
    reward_kwargs={"answer_format": "short"}, demonstrate=demonstrate))
