"""The supervised warm-up (trainer/warmup.py): demonstrations of generated training rows with the loss on the
model's tokens only, no held-out eval row in the warm-up or in RL's rows, a loss that falls, and the cache that a
second run takes its weights from without training."""
from __future__ import annotations

import random

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from glm5_model.tokenizer.build import TINY_DIR
from rollout.data import load_data
from rollout.data.render import render_prompt
from trainer.config import parse_config
from trainer.warmup import FamilySchedule, demonstrations, warm_up

from .test_config import compose_config

MIX = "factuality_qa,coding_fn,calculator"


def _cfg(tmp_path, *overrides: str):
    return parse_config(compose_config([
        "+experiment=smoke", "data.format=tasks", f"data.path='{MIX}'", "data.generated_tasks=24",
        "data.generated_eval_tasks=8", "data.eval_split=heldout", "rollout.agent.max_tokens=256",
        f"warmup.cache_dir={tmp_path / 'warmup'}", *overrides]))


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY_DIR))


def test_demonstrations_train_the_model_tokens_of_training_rows_only(tmp_path, tok):
    cfg = _cfg(tmp_path)
    data = load_data(cfg.data, tok)
    demos = demonstrations(data.train, tok, cfg.rollout.agent)
    by_task = {t: [d for d in demos if d.task == t] for t in MIX.split(",")}
    # Every calculator task has an expert demonstration; only some factuality and coding rows are taught.
    assert len(by_task["calculator"]) == 24
    assert 0 < len(by_task["factuality_qa"]) < 24 and 0 < len(by_task["coding_fn"]) < 24
    user = tok.convert_tokens_to_ids("<|user|>")
    rows = {r.index: r for r in data.train}
    for d in by_task["factuality_qa"] + by_task["coding_fn"]:
        prompt = render_prompt(tok, rows[d.row])
        assert d.item.tokens[:d.item.prompt_len] == prompt and d.item.tokens[-1] == user
        assert d.item.model_mask is None  # the whole response is the model's
    for d in by_task["calculator"]:
        mask = d.item.model_mask
        # turn, tool results, turn, tool result, final answer: the observations are not trained.
        assert [m for i, m in enumerate(mask) if i == 0 or mask[i - 1] != m] == [1, 0, 1, 0, 1]
        assert d.item.tokens[-1] == user

    # No held-out row is trained on: not by the warm-up, not by RL (whose rows are data.train).
    prompts = lambda rs: {tok.decode(render_prompt(tok, r)) for r in rs}  # noqa: E731
    eval_prompts = prompts(data.eval)
    assert len(eval_prompts) == 3 * 8
    assert not eval_prompts & prompts(data.train)
    assert not eval_prompts & {tok.decode(d.item.tokens[:d.item.prompt_len]) for d in demos}


def test_an_expert_that_leaves_a_task_to_rl_demonstrates_only_the_others(tmp_path, tok):
    cfg = _cfg(tmp_path, "data.path=price_check")
    rows = load_data(cfg.data, tok).train
    demos = demonstrations(rows, tok, cfg.rollout.agent)
    # price_check's expert returns None for half of the tasks: those rows are not taught, the others are
    # whole episodes (the call, the tool's answer untrained, the final answer).
    assert 0 < len(demos) < len(rows) == 24
    for d in demos:
        mask = d.item.model_mask
        assert [m for i, m in enumerate(mask) if i == 0 or mask[i - 1] != m] == [1, 0, 1]


def test_without_a_target_families_are_drawn_by_their_demonstrations_for_every_step():
    schedule = FamilySchedule({"a": 30, "b": 10}, None, 5, random.Random(0))
    draws = []
    for _ in range(400):
        draws.append(schedule.next())
        schedule.record(draws[-1], 0.0)
    assert 0.65 < draws.count("a") / len(draws) < 0.85 and None not in draws


def test_a_family_at_the_target_loss_gives_most_of_its_steps_to_the_others_until_all_are_there():
    # "a" learns fast (its loss falls 30% on each of its steps) and forgets a little on each step of "b", which
    # learns slowly; the target is judged on each family's last 3 steps.
    schedule = FamilySchedule({"a": 30, "b": 10}, 0.1, 3, random.Random(0))
    loss, draws = {"a": 1.0, "b": 1.0}, []
    while (family := schedule.next()) is not None:
        draws.append((family, schedule.done("a")))
        loss[family] *= 0.7 if family == "a" else 0.97
        if family == "b":
            loss["a"] *= 1.05
        schedule.record(family, loss[family])
        assert len(draws) < 1000
    learning = [f for f, a_done in draws if not a_done]
    rehearsing = [f for f, a_done in draws if a_done]
    # While learning, "a" has 3/4 of the steps (its share of demonstrations); once at the target, a quarter of
    # that weight: 30 * 0.25 / (30 * 0.25 + 10) = 0.43 of the steps, rehearsal that keeps it under the target.
    assert learning.count("a") / len(learning) > 0.6 and 0.2 < rehearsing.count("a") / len(rehearsing) < 0.55
    assert len(rehearsing) > 20 and schedule.done("a") and schedule.done("b")
    assert sum(schedule.losses["b"][-3:]) / 3 <= 0.1 < sum(schedule.losses["b"][-4:-1]) / 3


def test_warm_up_learns_and_a_second_run_takes_the_cache(ray_session, tiny_checkpoint, tmp_path, tok, capsys,
                                                         monkeypatch):
    cfg = _cfg(tmp_path, "data.path=factuality_qa", "warmup.steps=6", "warmup.batch_size=8", "warmup.lr=3e-3")
    rows = load_data(cfg.data, tok).train
    out = warm_up(cfg, tiny_checkpoint, rows, tok)
    record = (out / "warmup.json").read_text()
    nll = __import__("json").loads(record)["nll"]
    assert len(nll) == 6 and nll[-1] < nll[0], nll
    before, after = load_file(str(tiny_checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(before) == sorted(after) and any(not before[k].equal(after[k]) for k in before)
    assert "warm-up step 6/6" in capsys.readouterr().out

    import trainer.group

    def no_training(*args, **kwargs):
        raise AssertionError("the cached warm-up was trained again")
    monkeypatch.setattr(trainer.group, "TrainerGroup", no_training)
    assert warm_up(cfg, tiny_checkpoint, rows, tok) == out
    assert "taken from the cache" in capsys.readouterr().out
    # Another warm-up setting is another cache entry.
    other = _cfg(tmp_path, "data.path=factuality_qa", "warmup.steps=7", "warmup.batch_size=8", "warmup.lr=3e-3")
    with pytest.raises(AssertionError, match="trained again"):
        warm_up(other, tiny_checkpoint, rows, tok)


def test_a_warm_up_with_a_target_loss_stops_once_every_family_is_there(ray_session, tiny_checkpoint, tmp_path, tok,
                                                                        capsys):
    # Any loss is below 1000: each family is done after its first target_window (2) steps, and the warm-up ends
    # once both are, long before warmup.steps.
    cfg = _cfg(tmp_path, "data.path='factuality_qa,coding_fn'", "warmup.steps=50", "warmup.batch_size=4",
               "warmup.target_nll=1000", "warmup.target_window=2")
    record = __import__("json").loads((warm_up(cfg, tiny_checkpoint, load_data(cfg.data, tok).train, tok)
                                       / "warmup.json").read_text())
    steps, families = record["steps"], record["family"]
    assert steps == len(record["nll"]) == len(families) < 20, record
    assert min(families.count("coding_fn"), families.count("factuality_qa")) == 2, families
    assert f"every family's loss is below warmup.target_nll 1000.0 after {steps} steps" in capsys.readouterr().out
