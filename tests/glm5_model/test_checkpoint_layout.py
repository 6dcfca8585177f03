"""Offline HF <-> Megatron per-rank conversion: bit-exact round trips for several layouts, from a sharded HF
checkpoint; the tensor-parallel split table agrees with a real Megatron model's parameter attributes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from glm5_model.checkpoint_layout import Layout, _split_spec, hf_to_megatron, megatron_to_hf_dir
from glm5_model.hf_checkpoint import load_hf_state_dict


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint re-saved as two safetensors shards with an index, as large checkpoints come."""
    import shutil

    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("sharded") / "tiny"
    shutil.copytree(tiny_checkpoint, out)
    (out / "model.safetensors").unlink()
    state = load_hf_state_dict(tiny_checkpoint)
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(out / file))
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize("layout", [Layout(), Layout(tp=2, ep=2), Layout(tp=2, pp=3), Layout(tp=4, ep=4, pp=3),
                                    Layout(tp=2, ep=1, etp=2), Layout(pp=2, pp_first=1), Layout(ep=2, pp=2, pp_last=1)],
                         ids=str)
def test_round_trip_is_bit_exact(sharded_checkpoint, tmp_path, layout):
    meg = hf_to_megatron(sharded_checkpoint, tmp_path / "meg", layout, progress=False)
    ranks = sorted(p.name for p in meg.glob("mp_rank_*"))
    assert len(ranks) == layout.tp * layout.pp * layout.ep
    back = megatron_to_hf_dir(meg, tmp_path / "hf", progress=False)
    original, restored = load_hf_state_dict(sharded_checkpoint), load_hf_state_dict(back)
    assert sorted(original) == sorted(restored)
    changed = [k for k in original if not torch.equal(original[k], restored[k])]
    assert not changed, changed[:5]


def test_rank_files_hold_only_their_piece(sharded_checkpoint, tmp_path):
    from safetensors import safe_open

    meg = hf_to_megatron(sharded_checkpoint, tmp_path / "meg", Layout(tp=2, ep=2, pp=3), progress=False)
    with safe_open(str(meg / "mp_rank_01_001_001" / "layer_0001.safetensors"), "pt") as f:
        keys = set(f.keys())
        # stage 1 of 3 holds global layer 1 as its local layer 0; EP rank 1 holds experts 4..7 as local 0..3
        assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in keys
        assert not any("local_experts.4" in k for k in keys)
        assert f.get_tensor("decoder.layers.0.self_attention.linear_q_up_proj.weight").shape[0] == 192 // 2
        assert f.get_tensor("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight").shape[0] == 128


@pytest.mark.parametrize("layout, flag", [
    (Layout(tp=3), "--tp"), (Layout(ep=3), "--ep"), (Layout(pp=2), "--pp"),
    (Layout(pp=2, pp_first=1, pp_last=1), "--pp-first-layers [+] --pp-last-layers"),
    (Layout(pp=1, pp_first=1), "--pp-first-layers"), (Layout(pp=3, pp_first=0), "--pp-first-layers")])
def test_bad_layout_names_the_flag(sharded_checkpoint, tmp_path, layout, flag):
    with pytest.raises(ValueError, match=f"^{flag}:"):
        hf_to_megatron(sharded_checkpoint, tmp_path / "meg", layout, progress=False)


def test_uneven_stages_put_layers_where_megatron_does(sharded_checkpoint, tmp_path):
    meg = hf_to_megatron(sharded_checkpoint, tmp_path / "meg", Layout(pp=2, pp_first=1), progress=False)
    # 3 layers as 1 + 2: global layers 1 and 2 are stage 1's local layers 0 and 1
    assert sorted(p.name for p in (meg / "mp_rank_00_000_000").iterdir()) == ["embedding.safetensors",
                                                                               "layer_0000.safetensors"]
    assert sorted(p.name for p in (meg / "mp_rank_00_001_000").iterdir()) == ["head.safetensors",
                                                                               "layer_0001.safetensors",
                                                                               "layer_0002.safetensors"]


def test_split_table_matches_megatron_parameters(tiny_checkpoint):
    from glm5_model.convert import megatron_tensors
    from glm5_model.megatron_config import ParallelLayout
    from glm5_model.model import build_gpt_model
    from glm5_model.parallel import destroy_parallel, free_port, init_parallel

    init_parallel(0, 1, ParallelLayout(), master_port=free_port())
    try:
        model = build_gpt_model(json.loads((tiny_checkpoint / "config.json").read_text()))
        for name, param in megatron_tensors(model):
            tagged = getattr(param, "tensor_model_parallel", False)
            expected = (param.partition_dim, param.partition_stride) if tagged else None
            assert _split_spec(name) == expected, name
    finally:
        destroy_parallel()


def test_cli(sharded_checkpoint, tmp_path):
    run = [sys.executable, "-m", "glm5_model.convert"]
    a = subprocess.run(run + ["hf-to-megatron", "--hf", str(sharded_checkpoint), "--out", str(tmp_path / "m"),
                              "--tp", "2", "--ep", "2"], capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr[-2000:]
    b = subprocess.run(run + ["megatron-to-hf", "--megatron", str(tmp_path / "m"), "--out", str(tmp_path / "h")],
                       capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr[-2000:]
    bad = subprocess.run(run + ["hf-to-megatron", "--hf", str(sharded_checkpoint), "--out", str(tmp_path / "x"),
                                "--ep", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--ep: 3 does not divide n_routed_experts 8" in bad.stdout


@pytest.mark.parametrize("layout", [Layout(tp=2, ep=2), Layout(tp=2, ep=4, pp=3)], ids=str)
def test_glm45_round_trip_is_bit_exact(tmp_path, layout):
    from glm5_model.hf_checkpoint import make_random_checkpoint

    ckpt = make_random_checkpoint("tiny-glm45", tmp_path / "glm45", seed=4)
    back = megatron_to_hf_dir(hf_to_megatron(ckpt, tmp_path / "meg", layout, progress=False), tmp_path / "hf",
                              progress=False)
    original, restored = load_hf_state_dict(ckpt), load_hf_state_dict(back)
    assert sorted(original) == sorted(restored)
    assert all(torch.equal(original[k], restored[k]) for k in original)


@pytest.mark.parametrize("te_name, canonical", [
    ("decoder.layers.3.self_attention.linear_q_up_proj.layer_norm_weight",
     "decoder.layers.3.self_attention.q_layernorm.weight"),
    ("decoder.layers.3.self_attention.linear_kv_up_proj.layer_norm_weight",
     "decoder.layers.3.self_attention.kv_layernorm.weight"),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.0.input_layernorm.weight"),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
    ("decoder.layers.2.mlp.experts.linear_fc1.weight11", "decoder.layers.2.mlp.experts.local_experts.11.linear_fc1.weight"),
    ("decoder.layers.2.mlp.experts.linear_fc2.weight0", "decoder.layers.2.mlp.experts.local_experts.0.linear_fc2.weight"),
    # names both specs share stay as they are
    ("decoder.layers.2.mlp.shared_experts.linear_fc1.weight", "decoder.layers.2.mlp.shared_experts.linear_fc1.weight"),
    ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"),
])
def test_transformer_engine_names_map_to_canonical_names(te_name, canonical):
    """TransformerEngine's spec fuses norms into linears and groups experts; conversion sees local-spec names
    (the GPU test tests/glm5_model/test_gpu_path.py checks these are the names a TE model really has)."""
    from glm5_model.convert import canonical_name

    assert canonical_name(te_name) == canonical
