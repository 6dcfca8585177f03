"""The `tasks` data format: rows from task families and environments, mixed, numbered across generators,
labelled for their rewards (episodes for environments), and config errors that name the field."""
from __future__ import annotations

from collections import Counter

import pytest
from transformers import AutoTokenizer

from glm5_model.tokenizer.build import TINY_DIR
from rollout.config_schema import ConfigError
from rollout.data.config import DataConfig, validate_data_config
from rollout.data.formats import family_rewards
from rollout.data.loader import load_data


def test_a_mix_of_families_and_an_environment():
    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    cfg = validate_data_config(DataConfig(path="factuality_qa, coding_fn,calculator", format="tasks",
                                          generated_tasks=5, generated_eval_tasks=2, eval_split="heldout",
                                          shuffle=False))
    data = load_data(cfg, tok)
    assert [r.task for r in data.train] == ["factuality_qa"] * 5 + ["coding_fn"] * 5 + ["calculator"] * 5
    assert [r.index for r in data.train] == list(range(15))
    assert len(data.eval) == 6 and {r.label.get("task", {}).get("split") for r in data.eval[4:]} == {"heldout"}
    fact, code, calc = data.train[0], data.train[5], data.train[10]
    assert set(fact.label) >= {"answer"} and "tests" in code.label and not fact.tools
    assert calc.label["env"] == "calculator" and calc.tools and calc.label["task"]["data"]["basket"]
    assert family_rewards(cfg.path) == {"factuality_qa": ("factuality", {"answer_format": "short"}),
                                        "coding_fn": ("coding", {})}


def test_per_generator_counts_set_each_family_share_of_the_training_rows():
    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    cfg = validate_data_config(DataConfig(path="factuality_qa,coding_fn,price_check", format="tasks",
                                          generated_tasks=6, generated_eval_tasks=2, eval_split="heldout",
                                          generated_tasks_by_name={"factuality_qa": 9, "price_check": 3}))
    data = load_data(cfg, tok)
    assert sorted(Counter(r.task for r in data.train).items()) == [("coding_fn", 6), ("factuality_qa", 9),
                                                                   ("price_check", 3)]
    assert sorted(r.index for r in data.train) == list(range(18))
    assert Counter(r.task for r in data.eval) == {"factuality_qa": 2, "coding_fn": 2, "price_check": 2}


@pytest.mark.parametrize("overrides, field, says", [
    ({"path": "nosuch"}, "data.path", "no task family"),
    ({"path": "coding_fn", "generated_tasks_by_name": {"calculator": 3}}, "data.generated_tasks_by_name.calculator",
     "not one of data.path's generators"),
    ({"path": "coding_fn", "generated_tasks_by_name": {"coding_fn": 0}}, "data.generated_tasks_by_name.coding_fn",
     ">= 1"),
    ({"path": "coding_fn,coding_fn"}, "data.path", "named twice"),
    ({"path": "coding_fn", "split": "test"}, "data.split", "splits"),
    ({"path": "coding_fn", "eval_split": "train"}, "data.eval_split", "must differ"),
    ({"path": "coding_fn", "generated_tasks": 0}, "data.generated_tasks", ">= 1"),
])
def test_bad_generated_sources_name_the_field(overrides, field, says):
    with pytest.raises(ConfigError, match=rf"^{field}: .*{says}"):
        validate_data_config(DataConfig(format="tasks", **overrides))
