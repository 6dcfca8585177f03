"""Preset HF configs. `tiny` keeps every structural feature of GLM-5 (MLA, a first dense layer, sigmoid-routed MoE
with correction bias, top-k normalisation, routed scaling, one shared expert, the DSA indexer) at CPU size."""
from __future__ import annotations

import copy
from typing import Any

from glm5_model.tokenizer.build import VOCAB_SIZE

# What the two CPU-sized presets (GLM-5 `tiny`, GLM-4.5 `tiny-glm45`) share: sizes, the MoE, the tokenizer's ids.
_TINY_SHARED: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": [0, 7, 9],  # <|endoftext|>, <|user|>, <|observation|> in the tiny tokenizer
    "pad_token_id": 0,
    # Fields SGLang's DeepSeek-family model code reads but transformers 5 no longer writes.
    "moe_layer_freq": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "ep_size": 1,
    "torch_dtype": "float32",
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "architectures": ["GlmMoeDsaForCausalLM"],
        "model_type": "glm_moe_dsa",
        **_TINY_SHARED,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        # index_topk >= every context we serve on CPU, so DSA's selection keeps all tokens and dense MLA is exact.
        "index_topk": 2048,
        "index_n_heads": 4,
        "index_head_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
    },
    # One-GPU GLM-5: every structural feature of the full model (MLA with q/kv LoRA, first dense layer, sigmoid MoE
    # with correction bias and one shared expert, top-k normalisation, routed scaling, the DSA indexer) at ~250M
    # parameters. The vocabulary is the repo tokenizer's (VOCAB_SIZE = 512), not GLM-5's 154880: with the real
    # vocabulary the embedding and lm_head alone (2 x 154880 x 768 = 238M) would be as large as the whole
    # transformer, and the model must run end to end with the tokenizer this repo ships. Counts
    # (glm5_model.param_count, checked in tests/glm5_model/test_presets_plan.py): 246,230,784 total,
    # 64,564,992 active per token; 207.6M of the total are routed experts (32 x 11 MoE layers, top-4).
    "small": {
        "architectures": ["GlmMoeDsaForCausalLM"],
        "model_type": "glm_moe_dsa",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 12,
        "first_k_dense_replace": 1,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 32,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        # index_topk >= max_position_embeddings: DSA keeps every token, so the dense-MLA Megatron model is exact.
        "index_topk": 4096,
        "index_n_heads": 8,
        "index_head_dim": 64,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": [0, 7, 9],  # same tokenizer as tiny
        "pad_token_id": 0,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "ep_size": 1,
        "torch_dtype": "bfloat16",
    },
    # The published GLM-5 (zai-org/GLM-5) architecture: the defaults of transformers' GlmMoeDsaConfig (which the
    # HF docs tie to that checkpoint) written out. 743,911,199,232 parameters as transformers builds it (the MTP
    # layer the checkpoint carries, model.layers.78, is not built and not counted), 41,784,709,632 active per token
    # (39,881,544,192 without embedding and lm_head, the published "40B active" convention).
    "glm5-744b": {
        "architectures": ["GlmMoeDsaForCausalLM"],
        "model_type": "glm_moe_dsa",
        "vocab_size": 154880,
        "hidden_size": 6144,
        "intermediate_size": 12288,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 78,
        "first_k_dense_replace": 3,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "q_lora_rank": 2048,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64,
        "v_head_dim": 256,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "index_topk": 2048,
        "index_n_heads": 32,
        "index_head_dim": 128,
        "max_position_embeddings": 202752,
        # rope_theta does not change any count; 1e6 is what third-party GLM-5 loaders default to (transformers'
        # config class defaults to 1e4). Check against the checkpoint's config.json before loading real weights.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "num_nextn_predict_layers": 1,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "ep_size": 1,
        "torch_dtype": "bfloat16",
    },
    # GLM-4.5 (zai-org/GLM-4.5, 355B-A32B), a different architecture: GQA (96 query heads, 8 KV heads, head_dim 128)
    # with q/k/v bias, QK RMSNorm and half-rotary RoPE, no MLA, no DSA. transformers' Glm4MoeConfig defaults are the
    # smaller GLM-4.5-Air (hidden 4096, 46 layers, 128 experts), so the 355B values are written out here (they
    # match the published config and slime's glm4.5-355B-A32B Megatron arguments). Parameter counting and the
    # memory planner handle it; the Megatron mapping (glm5_model.megatron_config) does not.
    "glm45-355b": {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": 151552,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 92,
        "first_k_dense_replace": 3,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "attention_bias": True,
        "use_qk_norm": True,
        "n_routed_experts": 160,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1,
        "torch_dtype": "bfloat16",
    },
    # GLM-4.5 (glm4_moe) at CPU size: GQA attention with qkv bias, per-head q/k RMSNorm and half-dim rotary;
    # the same sigmoid-routed MoE as GLM-5. The reference for the GLM-4.5 mapping (tests/glm5_model/test_glm45.py).
    "tiny-glm45": {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        **_TINY_SHARED,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "attention_bias": True,
        "use_qk_norm": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    },
}


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
