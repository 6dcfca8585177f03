"""Preset HF configs. `tiny` keeps every structural feature of GLM-5 (MLA, a first dense layer, sigmoid-routed MoE
with correction bias, top-k normalisation, routed scaling, one shared expert, the DSA indexer) at CPU size."""
from __future__ import annotations

import copy
from typing import Any

from glm5_model.tokenizer.build import VOCAB_SIZE

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "architectures": ["GlmMoeDsaForCausalLM"],
        "model_type": "glm_moe_dsa",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        # index_topk >= every context we serve on CPU, so DSA's selection keeps all tokens and dense MLA is exact.
        "index_topk": 2048,
        "index_n_heads": 4,
        "index_head_dim": 32,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": [0, 7, 9],  # <|endoftext|>, <|user|>, <|observation|> in the tiny tokenizer
        "pad_token_id": 0,
        # Fields SGLang's DeepSeek-family model code reads but transformers 5 no longer writes.
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "ep_size": 1,
        "torch_dtype": "float32",
    },
}


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
