"""Bad config values stop the run before Ray starts, with a message naming the field."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import REPO_ROOT, ConfigError, parse_config


def compose_config(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_quickstart_composes_and_validates():
    """The README's quickstart is the task mix's recipe on one family of each kind (factuality, coding, the
    price_check agent task): a cached warm-up, then asynchronous RL with held-out evaluation per family from
    before RL on."""
    cfg = parse_config(compose_config(["+experiment=quickstart"]))
    assert cfg.model.preset == "tiny"
    assert cfg.logging.wandb_mode == "offline"
    assert (cfg.data.format, cfg.data.path, cfg.data.eval_split) == ("tasks", "factuality_qa,coding_fn,price_check",
                                                                  "heldout")
    assert cfg.warmup.steps > 0 and cfg.loop.mode == "async" and cfg.trainer.num_steps >= 1
    assert cfg.eval.at_start and cfg.eval.interval >= 1
    task_mix = parse_config(compose_config(["+experiment=task_mix"]))
    assert cfg.rollout == task_mix.rollout  # the same RL recipe; a longer warm-up and run (quickstart.yaml says why)
    assert (cfg.warmup.lr, cfg.trainer.lr) == (task_mix.warmup.lr, task_mix.trainer.lr)
    assert cfg.warmup.steps > task_mix.warmup.steps and cfg.trainer.num_steps > task_mix.trainer.num_steps


def test_quickstart_evaluates_every_held_out_row_it_generates():
    """eval.max_prompts cuts the eval rows (taken from each family in turn): it must not cut the quickstart's, and
    each family must have that many distinct held-out tasks (factuality has 95)."""
    from rewards.envs import load_env
    from rewards.tasks import load_task_family, registered_task_families

    cfg = parse_config(compose_config(["+experiment=quickstart"]))
    families = cfg.data.path.split(",")
    assert cfg.eval.max_prompts >= len(families) * cfg.data.generated_eval_tasks
    for name in families:
        generate = load_task_family(name).generate if name in registered_task_families() else \
            load_env(name).generate_tasks
        assert len(generate("heldout", cfg.data.generated_eval_tasks)) == cfg.data.generated_eval_tasks


def test_smoke_composes_and_validates():
    cfg = parse_config(compose_config(["+experiment=smoke"]))
    assert cfg.model.preset == "tiny" and cfg.warmup.steps == 0 and cfg.trainer.num_steps >= 1


@pytest.mark.parametrize("override, field", [
    ("trainer.lr=-1", "trainer.lr"),
    ("trainer.lr=abc", "trainer.lr"),
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("trainer.expert_parallel=3", "trainer.expert_parallel"),
    ("trainer.weight_sync=carrier_pigeon", "trainer.weight_sync"),
    ("trainer.weight_sync_bucket_mb=0", "trainer.weight_sync_bucket_mb"),
    ("trainer.weight_sync_verify=maybe", "trainer.weight_sync_verify"),
    ("model.preset=huge", "model.preset"),
    pytest.param("model.layer_spec=te", "model.layer_spec",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="valid where CUDA is")),
    ("reward.name=no_such_reward", "reward.name"),
    ("reward.timeout_s=0", "reward.timeout_s"),
    ("reward.dedupe=sometimes", "reward.dedupe"),
    ("+reward.combine=[{name: exact_match}, {name: bogus, weight: 2}]", "reward.combine[1].name"),
    ("+reward.combine=[{name: exact_match, wieght: 2}]", "reward.combine[0].wieght"),
    ("data.path=/nonexistent.jsonl", "data.path"),
    ("+trainer.learning_rate=1e-3", "trainer.learning_rate"),
    ("trainer.pipeline_first_stage_layers=1", "trainer.pipeline_first_stage_layers"),  # needs pipeline_parallel > 1
    ("eval.interval=-1", "eval.interval"),
    ("eval.temperature=-0.5", "eval.temperature"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
])
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        parse_config(compose_config(["+experiment=smoke", override]))
    assert str(info.value).startswith(field + ":"), str(info.value)


@pytest.mark.parametrize("overrides, field", [
    (["trainer.pipeline_parallel=2"], "trainer.pipeline_parallel"),  # the tiny model's 3 layers do not split evenly
    (["trainer.pipeline_parallel=2", "trainer.pipeline_last_stage_layers=3"], "trainer.pipeline_parallel"),
])
def test_pipeline_split_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        parse_config(compose_config(["+experiment=smoke", "trainer.world_size=2", *overrides]))
    assert str(info.value).startswith(field), str(info.value)


def test_uneven_pipeline_split_is_accepted():
    cfg = parse_config(compose_config(["+experiment=smoke", "trainer.world_size=2", "trainer.pipeline_parallel=2",
                                       "trainer.pipeline_first_stage_layers=1"]))
    assert cfg.trainer.pipeline_first_stage_layers == 1


def test_weight_sync_modes_are_accepted():
    for mode in ("tensor", "distributed", "disk"):
        cfg = parse_config(compose_config(["+experiment=smoke", f"trainer.weight_sync={mode}",
                                           "trainer.weight_sync_bucket_mb=0.5", "trainer.weight_sync_verify=true"]))
        assert (cfg.trainer.weight_sync, cfg.trainer.weight_sync_bucket_mb) == (mode, 0.5)
        assert cfg.trainer.weight_sync_verify is True
