"""Presets, analytic parameter counts and the layout planner.

The analytic counts (glm5_model.param_count) are checked against models actually built: transformers'
GlmMoeDsaForCausalLM / Glm4MoeForCausalLM (the full-size ones on the meta device, no memory) and our Megatron model.
The exact integers below are what those builds measure; they are written out so a change anywhere shows up here.
"""
from __future__ import annotations

import json

import pytest
import torch

from glm5_model.param_count import count_params
from glm5_model.plan import Layout, LayoutError, Workload, main, plan, stage_layers
from glm5_model.presets import PRESETS, preset_config

# (total parameters, active per token, active without embedding + lm_head, MoE selection-bias buffer numel)
EXPECTED = {
    "tiny": (867_168, 572_256, 441_184, 16),
    "small": (246_230_784, 64_564_992, 63_778_560, 352),
    "glm5-744b": (743_911_199_232, 41_784_709_632, 39_881_544_192, 19_200),
    "glm45-355b": (352_797_814_784, 33_632_251_904, 32_080_359_424, 14_240),
}


def _hf_model(name: str, device: str = "meta"):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    cfg = preset_config(name)
    cls, config_cls = {"glm_moe_dsa": (GlmMoeDsaForCausalLM, GlmMoeDsaConfig),
                       "glm4_moe": (Glm4MoeForCausalLM, Glm4MoeConfig)}[cfg["model_type"]]
    config = config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device(device):
        return cls(config)


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def test_tiny_preset_is_unchanged():
    # tiny is the oracle configuration of every other test; the presets added next to it must not move it.
    tiny = PRESETS["tiny"]
    assert (tiny["hidden_size"], tiny["num_hidden_layers"], tiny["n_routed_experts"], tiny["vocab_size"]) == \
        (128, 3, 8, 512)


@pytest.mark.parametrize("name", ["tiny", "small", "glm5-744b", "glm45-355b"])
def test_analytic_count_matches_transformers(name):
    model = _hf_model(name, device="cpu" if name == "tiny" else "meta")
    counted = count_params(preset_config(name))
    built = _numel(model.parameters())
    assert counted.total == built, f"{name}: analytic {counted.total:,} != transformers {built:,}"
    # The state dict (= checkpoint) also carries the per-layer selection bias, a buffer.
    assert counted.total + counted.buffers == _numel(model.state_dict().values())
    total, active, active_no_emb, buffers = EXPECTED[name]
    assert (counted.total, counted.active, counted.active - counted.embedding - counted.lm_head, counted.buffers) \
        == (total, active, active_no_emb, buffers)
    assert sum(counted.groups().values()) == counted.total


def test_glm5_744b_is_744b_total_and_40b_active():
    c = count_params(preset_config("glm5-744b"))
    assert round(c.total / 1e9) == 744  # 743.91B: the published "744B" (MTP layer not included)
    # The published "~40B active" matches the count without the embedding and lm_head (39.88B); with them 41.78B.
    assert round((c.active - c.embedding - c.lm_head) / 1e9) == 40
    assert round(c.active / 1e9) == 42
    assert c.mtp == 9_952_920_320  # the checkpoint's MTP layer (layer 78), not built by transformers


def test_glm45_355b_counts():
    c = count_params(preset_config("glm45-355b"))
    # 352.80B as transformers builds it; + the MTP layer (3.99B) = 356.79B, the published "355B" lies between.
    assert round(c.total / 1e9) == 353 and round((c.total + c.mtp) / 1e9) == 357
    assert round((c.active - c.embedding - c.lm_head) / 1e9) == 32  # published "32B active"


def test_indexer_shapes_follow_transformers():
    """Per-module check on tiny: the DSA indexer and the MLA projections are counted as transformers builds them."""
    cfg = preset_config("tiny")
    model = _hf_model("tiny", device="meta")
    indexer = _numel(model.model.layers[0].self_attn.indexer.parameters())
    counted = count_params(cfg)
    assert counted.layers[0].indexer == indexer
    assert counted.layers[0].total == _numel(model.model.layers[0].parameters())
    assert counted.layers[1].total == _numel(model.model.layers[1].parameters())


def test_shared_indexer_layers_have_no_indexer():
    cfg = preset_config("tiny") | {"index_topk_pattern": "FSF"}
    counted = count_params(cfg)
    assert [l.indexer > 0 for l in counted.layers] == [True, False, True]


@pytest.fixture(scope="module")
def megatron_world1():
    from glm5_model.megatron_config import ParallelLayout
    from glm5_model.parallel import destroy_parallel, free_port, init_parallel

    init_parallel(0, 1, ParallelLayout(), master_port=free_port())
    yield
    destroy_parallel()


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_analytic_count_matches_megatron(megatron_world1, name):
    from glm5_model.model import build_gpt_model

    cfg = preset_config(name)
    with torch.device("meta"):
        model = build_gpt_model(cfg)
    counted = count_params(cfg)
    assert _numel(model.parameters()) == counted.total
    assert _numel(b for n, b in model.named_buffers() if n.endswith("expert_bias")) == counted.buffers


def test_glm5_744b_layers_at_full_width_match_megatron(megatron_world1):
    """The full 744B Megatron build on meta takes ~40 s here (test below, marked slow); four layers at full width
    (the 3 dense + 1 MoE, every tensor shape of the real model) check the same shapes in ~2 s."""
    from glm5_model.model import build_gpt_model

    cfg = preset_config("glm5-744b") | {"num_hidden_layers": 4}
    with torch.device("meta"):
        model = build_gpt_model(cfg, params_dtype=torch.bfloat16)
    assert _numel(model.parameters()) == count_params(cfg).total == 12_983_272_448


@pytest.mark.slow
def test_glm5_744b_full_megatron_build_on_meta(megatron_world1):
    from glm5_model.model import build_gpt_model

    cfg = preset_config("glm5-744b")
    with torch.device("meta"):
        model = build_gpt_model(cfg, params_dtype=torch.bfloat16)
    assert _numel(model.parameters()) == EXPECTED["glm5-744b"][0]


# ---------------------------------------------------------------------------------------------------- planner

GLM5_LAYOUT = Layout(tp=8, pp=8, ep=32, etp=1, dp=4, pp_first_layers=9, pp_last_layers=9)


def test_plan_glm5_744b_on_256_h100():
    p = plan(preset_config("glm5-744b"), GLM5_LAYOUT, Workload(seq_len=4096), preset="glm5-744b")
    assert p.total_params == EXPECTED["glm5-744b"][0]
    assert [len(s.layers) for s in p.stages] == [9, 10, 10, 10, 10, 10, 10, 9]
    # Middle stage: 10 MoE layers, 256/32 = 8 experts each, the rest split by TP or replicated.
    lp = count_params(preset_config("glm5-744b")).layers[40]
    per_layer = lp.attention_tp // 8 + lp.attention_replicated + lp.mlp_tp // 8 + lp.router + lp.routed_experts // 32
    assert p.stages[1].params == 10 * per_layer == 3_524_021_760
    # bf16 weights + bf16 grads + Adam (fp32 master, m, v): expert-DP is 1 here, so expert state is not sharded.
    s = p.stages[1]
    assert s.weights == pytest.approx(3_524_021_760 * 2 / 2**30)
    assert s.optimizer < 12 * s.params / 2**30
    assert p.peak.total < 79.6


def test_distributed_optimizer_shards_over_dp():
    hf = preset_config("small")
    sharded = plan(hf, Layout(dp=4), Workload(distributed_optimizer=True)).stages[0]
    full = plan(hf, Layout(dp=4), Workload(distributed_optimizer=False)).stages[0]
    assert sharded.optimizer == pytest.approx(full.optimizer / 4)
    assert full.optimizer == pytest.approx(full.params * 12 / 2**30)  # Adam on bf16 params: 4 + 4 + 4 bytes


def test_recompute_orders_activation_memory():
    hf = preset_config("glm5-744b")
    act = {r: plan(hf, GLM5_LAYOUT, Workload(recompute=r)).peak.activations for r in ("full", "selective", "none")}
    assert act["full"] < act["selective"] < act["none"]


@pytest.mark.parametrize("layout, flag", [
    (Layout(tp=3, dp=1), "--tp"),                           # 64 heads
    (Layout(ep=3, dp=3), "--ep"),                           # 256 experts
    (Layout(pp=8, dp=1), "--pp"),                           # 78 layers
    (Layout(tp=8, pp=6, ep=32, dp=2), "--ep 32 x --etp 1"),  # EP must fold into TP x DP = 16
    (Layout(tp=8, etp=3, dp=3), "--etp"),
    (Layout(pp=8, pp_first_layers=10, pp_last_layers=10, dp=1), "--pp"),  # 58 over 6 stages
])
def test_invalid_layouts_name_the_flag(layout, flag):
    with pytest.raises(LayoutError, match=flag.replace("+", r"\+")):
        plan(preset_config("glm5-744b"), layout, Workload())


def test_uneven_pipeline_split():
    assert [len(s) for s in stage_layers(78, Layout(pp=8, pp_first_layers=9, pp_last_layers=9))] == \
        [9, 10, 10, 10, 10, 10, 10, 9]
    assert [len(s) for s in stage_layers(78, Layout(pp=6))] == [13] * 6


def test_cli_nodes_and_errors(capsys):
    argv = ["--preset", "glm5-744b", "--tp", "8", "--pp", "8", "--ep", "32", "--pp-first-layers", "9",
            "--pp-last-layers", "9", "--nodes", "32", "--gpus-per-node", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "743,911,199,232" in out and "41,784,709,632" in out and "world 256 = tp 8 x pp 8 x dp 4" in out
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["dp"] == 4
    assert main(argv + ["--dp", "2"]) == 2
    assert "--dp 2 disagrees" in capsys.readouterr().err
    assert main(["--preset", "glm5-744b", "--tp", "8", "--dp", "1", "--ep", "256"]) == 2
    assert "--ep 256" in capsys.readouterr().err
