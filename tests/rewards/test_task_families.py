"""The built-in single-turn task families: deterministic generators whose train and held-out splits never share a
task key, demonstrations their own rewards pay in full (coding through the real sandbox), and the
partial-teaching rules the warm-up relies on (some unknown facts demonstrated as abstentions, half the coding
tasks demonstrated). The calculator environment's expert is checked by trainer/warmup's test."""
from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest

from rewards import RewardInput, RewardRunner, RewardSpec
from rewards.tasks import load_task_family, registered_task_families
from rewards.tasks.builtin import coding_fn, factuality_qa


def _score(family, tasks, responses):
    runner = RewardRunner([RewardSpec(family.reward, 1.0, family.reward_kwargs)])
    inputs = [RewardInput(t.prompt, r, t.data) for t, r in zip(tasks, responses)]
    return asyncio.run(runner.score_many(inputs))


@pytest.mark.parametrize("name", ["factuality_qa", "coding_fn"])
def test_generators_are_deterministic_with_disjoint_splits(name):
    family = load_task_family(name)
    assert name in registered_task_families()
    train, again = family.generate("train", 80, seed=3), family.generate("train", 80, seed=3)
    assert [t.prompt for t in train] == [t.prompt for t in again]
    assert [t.prompt for t in family.generate("train", 80, seed=4)] != [t.prompt for t in train]
    heldout = family.generate("heldout", 20, seed=3)
    assert {t.split for t in train} == {"train"} and {t.split for t in heldout} == {"heldout"}
    prompts = lambda ts: {t.prompt[-1]["content"] for t in ts}  # noqa: E731
    # No prompt of one split is in the other, whatever the seeds.
    assert not prompts(train) & prompts(family.generate("heldout", 20, seed=9))
    assert len(prompts(train)) == 80
    with pytest.raises(ValueError, match="split"):
        family.generate("test", 1)


def test_factuality_demonstrations_are_paid_as_their_kind():
    family = load_task_family("factuality_qa")
    tasks = family.generate("train", 120, seed=0)
    demos = [family.demonstrate(t) for t in tasks]
    known = [t.data["known"] for t in tasks]
    assert all(d == t.data["answer"] for d, t, k in zip(demos, tasks, known) if k)
    abstentions = [d for d, k in zip(demos, known) if not k]
    # Some unknown facts are taught as abstentions, most are not taught at all (the warm-up's guesses are what
    # RL should turn into abstentions).
    assert 0 < abstentions.count(factuality_qa.ABSTAIN) < 0.5 * len(abstentions)
    assert set(abstentions) <= {factuality_qa.ABSTAIN, None}
    shown = [(t, d) for t, d in zip(tasks, demos) if d is not None]
    results = _score(family, [t for t, _ in shown], [d for _, d in shown])
    for (t, _), r in zip(shown, results):
        assert r.components["factuality/" + ("correct" if t.data["known"] else "abstained")] == 1.0, t.prompt
    # Guessing another country's capital is a hallucination.
    other = factuality_qa.WORLD[0][1] if tasks[0].data["answer"] != factuality_qa.WORLD[0][1] \
        else factuality_qa.WORLD[1][1]
    (wrong,) = _score(family, tasks[:1], [other])
    assert wrong.score == -1.0


def test_coding_demonstrations_pass_in_the_sandbox_and_near_misses_fail():
    family = load_task_family("coding_fn")
    tasks = family.generate("train", 40, seed=1)
    demonstrated = [t for t in tasks if family.demonstrate(t) is not None]
    assert 0.25 * len(tasks) < len(demonstrated) < 0.75 * len(tasks)
    ops = Counter(next(op for op, (_, expression, _, _) in coding_fn.OPERATIONS.items()
                       if re.fullmatch(re.escape(expression).replace(r"\{k\}", r"\d+"),
                                       t.data["solution"].split("return ")[1].strip())) for t in tasks)
    assert len(ops) >= 7 and ops.most_common(1)[0][1] < 10, ops
    sample = tasks[:8]
    good = _score(family, sample, [t.data["solution"] for t in sample])
    assert [r.score for r in good] == [1.0] * len(sample)
    # The right operation with the constant off by one, or a constant answer, fails some test.
    off_by_one = [t.data["solution"].rstrip("\n") + " + 1\n" for t in sample]
    constant = ["def f(x):\n    return 0\n"] * len(sample)
    assert all(r.score < 1.0 for r in _score(family, sample, off_by_one))
    assert all(r.score < 1.0 for r in _score(family, sample, constant))


def test_the_coding_family_has_enough_tasks_for_the_quickstart():
    assert len(coding_fn.OPERATIONS) >= 8
    assert len(load_task_family("coding_fn").generate("train", 120)) == 120
