"""Builds GLM-5 as a Megatron-core GPTModel: MLA with DeepSeek Sparse Attention (indexer + top-k selection),
first-k dense layers, then sigmoid-routed MoE with a shared expert.

Layer spec is chosen by where we run: local (non-TransformerEngine) modules on CPU, TransformerEngine modules
when it is installed and a GPU is present; the DSA core attention is Megatron's unfused one on both.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

from glm5_model.compat import cuda_available, install_compat, mla_core_attention_class, param_device
from glm5_model.dsa import dsa_core_attention_spec
from glm5_model.megatron_config import ParallelLayout, is_glm45, rope_settings, to_transformer_config


def use_transformer_engine(layer_spec: str = "auto") -> bool:
    """`auto`: TransformerEngine when it is installed and a GPU is present, else local modules; `local` / `te`
    force one (asking for `te` without CUDA and transformer_engine is an error, not a silent fallback)."""
    available = cuda_available() and importlib.util.find_spec("transformer_engine") is not None
    if layer_spec == "te" and not available:
        raise ValueError("layer_spec: 'te' needs CUDA and the transformer_engine package")
    if layer_spec not in ("auto", "local", "te"):
        raise ValueError(f"layer_spec: {layer_spec!r} is not one of ['auto', 'local', 'te']")
    return available if layer_spec == "auto" else layer_spec == "te"


def _max_context(hf: dict[str, Any]) -> int:
    return int(hf.get("max_position_embeddings", 4096))


# transformers' GLM-5 builds q_a_layernorm and kv_a_layernorm with its RMSNorm's default eps (1e-6), not
# config.rms_norm_eps (1e-5); Megatron uses one layernorm_epsilon for every norm. Leaving it costs ~1e-4 in logits.
LATENT_NORM_EPS = 1e-6


class RMSNorm(torch.nn.RMSNorm):
    """Local (non-TE) RMSNorm that also works with sequence parallelism: Megatron's torch-norm wrapper refuses
    sequence_parallel, and the weight must carry the `sequence_parallel` tag so finalize_model_grads all-reduces
    its gradient over tensor-parallel ranks (each rank normalises a different slice of the sequence)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype, device=param_device(config))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


class LatentRMSNorm(RMSNorm):
    """RMSNorm for MLA's q/kv latents with GLM-5's fixed eps."""

    def __init__(self, config, hidden_size: int, eps: float = LATENT_NORM_EPS, **kwargs):
        super().__init__(config, hidden_size, eps=LATENT_NORM_EPS, **kwargs)


def _latent_te_norm_linear():
    """TransformerEngine's spec fuses MLA's q/kv latent norms into the up projections, which read the model-wide
    layernorm_epsilon; GLM-5's latent norms need LATENT_NORM_EPS, so the fused linear gets a config copy with it."""
    import copy

    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    class LatentTELayerNormColumnParallelLinear(TELayerNormColumnParallelLinear):
        def __init__(self, *args, config, **kwargs):
            config = copy.copy(config)
            config.layernorm_epsilon = LATENT_NORM_EPS
            super().__init__(*args, config=config, **kwargs)

    return LatentTELayerNormColumnParallelLinear


def _duplicated_linear():
    from megatron.core.post_training.modelopt.layers import Linear

    return Linear


def build_layer_spec(config, layer_spec: str = "auto"):
    """The standard MLA decoder spec (first-k dense / MoE pattern from config.moe_layer_freq) with DSA as the core
    attention. Built from a DSA-less copy of the config because Megatron's own DSA block spec is TE-only."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    te = use_transformer_engine(layer_spec)
    DuplicatedLinear = None if te else _duplicated_linear()  # noqa: N806 - a class
    dense_config = dataclasses.replace(config, experimental_attention_variant=None)
    spec = get_gpt_decoder_block_spec(dense_config, use_transformer_engine=te, normalization="RMSNorm")
    use_dsa = config.experimental_attention_variant == "dsa"
    mla = getattr(config, "multi_latent_attention", False)
    for layer in spec.layer_specs:
        attn = layer.submodules.self_attention.submodules
        if not mla:  # GLM-4.5: standard GQA attention; only the norms change (sequence-parallel-aware RMSNorm)
            if not te:
                attn.q_layernorm = attn.k_layernorm = RMSNorm
                layer.submodules.input_layernorm = RMSNorm
                layer.submodules.pre_mlp_layernorm = RMSNorm
            continue
        if use_dsa:
            attn.core_attention = dsa_core_attention_spec()
        elif not te:
            attn.core_attention = mla_core_attention_class()
        if te:
            attn.linear_q_up_proj = attn.linear_kv_up_proj = _latent_te_norm_linear()
        else:
            # Megatron's local MLA spec makes the down projections column-parallel; with tensor parallelism the
            # gradient of the shared rotary key (k_pos_emb, sliced out of the gathered kv_down output) then misses
            # the other ranks' heads (measured: grads off by ~0.5% at TP2). Its duplicated `Linear` keeps the
            # projection whole and routes k_pos_emb through the sequence-parallel gather, whose backward sums.
            attn.linear_q_down_proj = DuplicatedLinear
            attn.linear_kv_down_proj = DuplicatedLinear
            attn.q_layernorm = LatentRMSNorm
            attn.kv_layernorm = LatentRMSNorm
            layer.submodules.input_layernorm = RMSNorm
            layer.submodules.pre_mlp_layernorm = RMSNorm
    if not te:
        spec.layer_norm = RMSNorm
    return spec


def build_gpt_model(hf: dict[str, Any], layout: ParallelLayout = ParallelLayout(),
                    params_dtype: torch.dtype = torch.float32, pre_process: bool = True, post_process: bool = True,
                    bias_update_rate: float = 0.0, layer_spec: str = "auto"):
    """Megatron model for an HF GLM-5 (glm_moe_dsa) or GLM-4.5 (glm4_moe) config. Megatron's parallel state must
    already be initialised."""
    install_compat()
    from megatron.core.models.gpt import GPTModel

    te = use_transformer_engine(layer_spec)
    # TransformerEngine runs the local experts as one grouped GEMM (parameter names differ; glm5_model/convert.py
    # maps them to the canonical per-expert names).
    config = to_transformer_config(hf, layout, params_dtype, bias_update_rate, grouped_experts=te)
    # MLA (GLM-5) applies its own rotary embedding inside attention; GLM-4.5 uses the model-level one.
    rope = rope_settings(hf) if is_glm45(hf) else {"position_embedding_type": "none"}
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(config, "te" if te else "local"),
        vocab_size=hf["vocab_size"],
        max_sequence_length=_max_context(hf),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        **rope,
    )
    device = param_device(config)
    if device is not None:
        # modelopt's duplicated Linear (MLA's down projections in the local spec) allocates on the CPU whatever
        # Megatron's device choice (MLA accepts only that exact class, so no subclass can fix it). `to` moves
        # .data in place: the Parameters keep their Megatron attributes.
        model.to(device)
    freeze_indexer(model)
    return model


def freeze_indexer(model: torch.nn.Module) -> None:
    """The DSA indexer does not train in RL (see glm5_model/dsa.py)."""
    for name, param in model.named_parameters():
        if ".indexer." in name:
            param.requires_grad_(False)
