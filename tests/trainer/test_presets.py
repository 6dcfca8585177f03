"""The experiment presets beyond the CPU ones: each composes and validates, and its layout fits the GPUs it names
by the memory planner (glm5_model/plan.py) on the workload it documents."""
from __future__ import annotations

import json

import pytest
from omegaconf.errors import InterpolationResolutionError

from glm5_model.plan import Layout, Workload, plan, resolve_dp
from glm5_model.presets import PRESETS
from tests.trainer.test_config import compose_config
from trainer.config import ConfigError, parse_config

H100_GIB = 79.6


def _peak_gib(cfg, seq_len: int, micro_batch: int, recompute: str, gpus_per_node: int, nodes: int) -> float:
    t = cfg.trainer
    layout = Layout(tp=t.tensor_parallel, pp=t.pipeline_parallel, ep=t.expert_parallel,
                    dp=resolve_dp(t.tensor_parallel, t.pipeline_parallel, None, nodes, gpus_per_node),
                    pp_first_layers=t.pipeline_first_stage_layers, pp_last_layers=t.pipeline_last_stage_layers)
    assert layout.world == t.world_size, "the preset's world size is not the GPUs it plans for"
    p = plan(PRESETS[cfg.model.preset], layout, Workload(seq_len=seq_len, micro_batch=micro_batch,
                                                         precision="bf16", recompute=recompute))
    return p.peak.total


def test_small_1gpu_preset_fits_one_gpu():
    cfg = parse_config(compose_config(["+experiment=small_1gpu"]))
    assert cfg.model.preset == "small" and cfg.trainer.world_size == 1 and cfg.loop.mode == "async"
    assert cfg.model.dtype == "bfloat16"
    # The trainer's share, as the preset's header says; the engine's KV cache takes much of the rest.
    peak = _peak_gib(cfg, seq_len=2048, micro_batch=cfg.trainer.micro_batch_size, recompute="none",
                     gpus_per_node=1, nodes=1)
    assert peak < H100_GIB / 4, peak


def test_glm5_744b_preset_is_the_documented_layout(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["glm5-744b"]))  # stands in for the published one
    monkeypatch.setenv("GLM5_CHECKPOINT", str(tmp_path))
    cfg = parse_config(compose_config(["+experiment=glm5_744b"]))
    t = cfg.trainer
    assert (t.tensor_parallel, t.pipeline_parallel, t.expert_parallel, t.world_size) == (8, 8, 32, 256)
    peak = _peak_gib(cfg, seq_len=4096, micro_batch=t.micro_batch_size, recompute="full", gpus_per_node=8,
                     nodes=32)
    assert peak == pytest.approx(50.06, abs=0.01)  # docs/plan-744b.md
    assert peak < H100_GIB


def test_glm5_744b_preset_needs_the_checkpoint_named(monkeypatch, tmp_path):
    monkeypatch.delenv("GLM5_CHECKPOINT", raising=False)
    with pytest.raises(InterpolationResolutionError, match="GLM5_CHECKPOINT"):
        compose_config(["+experiment=glm5_744b"])
    monkeypatch.setenv("GLM5_CHECKPOINT", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"model\.checkpoint_dir: no checkpoint at .*744B parameters"):
        parse_config(compose_config(["+experiment=glm5_744b"]))
