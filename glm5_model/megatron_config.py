"""One mapping from an HF GLM-5 config (glm_moe_dsa) to Megatron-core's MLATransformerConfig."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# torch only inside the functions that build Megatron configs: the driver's config check imports this module for
# pipeline_stage_layers before its engines start (trainer/launch.py), and needs no torch there.
if TYPE_CHECKING:
    import torch

# HF fields that change the math and that this mapping knows how to express; anything else that would alter
# the model is rejected by name instead of being ignored.
_SUPPORTED_ROPE_TYPES = ("default",)
_EXPECTED = {
    "hidden_act": "silu",
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "n_group": 1,
    "topk_group": 1,
}


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    expert_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    # Experts are tensor-parallel like the dense layers when not expert-parallel; with EP they stay whole
    # (Megatron: expert TP x EP x PP must divide the world, so TP2 x EP2 on 2 ranks needs expert TP 1).
    expert_tensor_parallel: int | None = None
    # Uneven pipeline: layers on the first / last stage (the rest split evenly), e.g. GLM-5's 78 layers on PP8.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    @property
    def expert_tp(self) -> int:
        if self.expert_tensor_parallel is not None:
            return self.expert_tensor_parallel
        return self.tensor_parallel if self.expert_parallel == 1 else 1


def pipeline_stage_layers(num_layers: int, pp: int, first: int | None = None, last: int | None = None,
                          names: tuple[str, str, str] = ("pipeline_parallel", "first_stage_layers",
                                                         "last_stage_layers")) -> list[int]:
    """Decoder layers per pipeline stage, as Megatron splits them: `first` / `last` layers on the first / last
    stage when given (num_layers_in_first/last_pipeline_stage), the rest evenly. `names` are the caller's names
    for (pp, first, last), so the error names the field or flag the user set."""
    pp_name, first_name, last_name = names
    fixed = [(n, v) for n, v in ((first_name, first), (last_name, last)) if v is not None]
    if pp == 1:
        if fixed:
            raise ValueError(f"{fixed[0][0]}: only meaningful with {pp_name} > 1")
        return [num_layers]
    for name, value in fixed:
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    rest_layers = num_layers - sum(v for _, v in fixed)
    rest_stages = pp - len(fixed)
    if rest_stages == 0:
        if rest_layers != 0:
            raise ValueError(f"{first_name} + {last_name}: {first} + {last} != {num_layers} layers with {pp_name} 2")
        return [first, last]
    if rest_layers < rest_stages or rest_layers % rest_stages:
        flag = "/".join([pp_name] + [n for n, _ in fixed])
        raise ValueError(f"{flag}: {rest_layers} layers do not split evenly over {rest_stages} pipeline stages "
                         f"(num_hidden_layers={num_layers}); pick a divisor or set {first_name}/{last_name}")
    counts = [rest_layers // rest_stages] * rest_stages
    return ([first] if first is not None else []) + counts + ([last] if last is not None else [])


def is_glm45(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == "glm4_moe"


def check_supported(hf: dict[str, Any]) -> None:
    if hf.get("model_type") not in (None, "glm_moe_dsa", "glm4_moe"):
        raise ValueError(f"model_type: {hf.get('model_type')!r} is not supported "
                         "(expected 'glm_moe_dsa' (GLM-5) or 'glm4_moe' (GLM-4.5))")
    if is_glm45(hf) and not hf.get("use_qk_norm", False):
        raise ValueError("use_qk_norm: False is not supported for glm4_moe (GLM-4.5 checkpoints use it)")
    for key, expected in _EXPECTED.items():
        if key in hf and hf[key] != expected:
            raise ValueError(f"{key}: {hf[key]!r} is not supported (only {expected!r})")
    rope = hf.get("rope_parameters") or {"rope_type": "default"}
    if rope.get("rope_type", "default") not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type: {rope.get('rope_type')!r} is not supported yet "
                         f"(supported: {list(_SUPPORTED_ROPE_TYPES)})")
    if hf.get("n_shared_experts", 1) != 1:
        raise ValueError(f"n_shared_experts: {hf['n_shared_experts']} is not supported (only 1)")
    shared = [i for i, t in enumerate(hf.get("indexer_types") or []) if t != "full"]
    if shared:
        raise ValueError(f"indexer_types: layers {shared[:5]} reuse another layer's top-k ('shared'); "
                         "only 'full' (every layer runs its own indexer) is supported")


def moe_layer_pattern(hf: dict[str, Any]) -> list[int]:
    """1 for an MoE layer, 0 for a dense one; GLM-5 starts with `first_k_dense_replace` dense layers."""
    types = hf.get("mlp_layer_types")
    if types is None:
        k = hf.get("first_k_dense_replace", 0)
        types = ["dense"] * k + ["sparse"] * (hf["num_hidden_layers"] - k)
    return [1 if t == "sparse" else 0 for t in types]


def _moe_and_parallel_fields(hf: dict[str, Any], layout: ParallelLayout, params_dtype: torch.dtype,
                             bias_update_rate: float = 0.0, grouped_experts: bool = False) -> dict:
    """What GLM-5 and GLM-4.5 share: the sigmoid-routed MoE with a shared expert, SwiGLU, norms, parallelism."""
    import torch

    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-5),
        gated_linear_unit=True,
        # With gated_linear_unit Megatron defaults to GeLU (GeGLU); GLM uses SwiGLU.
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=hf["n_routed_experts"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=hf["moe_intermediate_size"] * hf.get("n_shared_experts", 1),
        moe_router_topk=hf["num_experts_per_tok"],
        moe_layer_freq=moe_layer_pattern(hf),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        # Auxiliary-loss-free balancing: after each step the selection bias moves toward under-used experts.
        moe_router_bias_update_rate=bias_update_rate,
        moe_router_topk_scaling_factor=hf.get("routed_scaling_factor", 1.0),
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=grouped_experts,
        tensor_model_parallel_size=layout.tensor_parallel,
        expert_model_parallel_size=layout.expert_parallel,
        expert_tensor_parallel_size=layout.expert_tp,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # activations sent between pipeline stages
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def _glm45_transformer_config(hf: dict[str, Any], layout: ParallelLayout, params_dtype: torch.dtype,
                              bias_update_rate: float, grouped_experts: bool):
    """GLM-4.5: grouped-query attention with qkv bias and per-head q/k RMSNorm; rotary on part of each head."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type: {rope.get('rope_type')!r} is not supported for glm4_moe")
    return TransformerConfig(
        num_query_groups=hf["num_key_value_heads"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        add_qkv_bias=bool(hf.get("attention_bias", False)),
        qk_layernorm=True,
        **_moe_and_parallel_fields(hf, layout, params_dtype, bias_update_rate, grouped_experts),
    )


def rope_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """GPTModel's own rotary arguments (GLM-4.5; GLM-5's MLA applies rope inside attention)."""
    rope = hf.get("rope_parameters") or {}
    return {"position_embedding_type": "rope", "rotary_percent": float(rope.get("partial_rotary_factor", 1.0)),
            "rotary_base": int(rope.get("rope_theta", 10000.0))}


def to_transformer_config(hf: dict[str, Any], layout: ParallelLayout = ParallelLayout(),
                          params_dtype: torch.dtype | None = None, bias_update_rate: float = 0.0,
                          grouped_experts: bool = False):
    """`bias_update_rate` > 0 turns on the auxiliary-loss-free expert-bias update (0 keeps the checkpoint's
    selection bias fixed, the usual choice in RL). `grouped_experts` runs a layer's local experts as one grouped
    GEMM (TransformerEngine's GroupedLinear). `params_dtype`: float32 when None."""
    import torch
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    params_dtype = torch.float32 if params_dtype is None else params_dtype

    check_supported(hf)
    if is_glm45(hf):
        return _glm45_transformer_config(hf, layout, params_dtype, bias_update_rate, grouped_experts)
    if hf.get("attention_bias", False):
        raise ValueError("attention_bias: True is not supported for glm_moe_dsa")
    rope = hf.get("rope_parameters") or {}
    return MLATransformerConfig(
        q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        qk_layernorm=True,
        rope_type="rope",
        rotary_base=rope.get("rope_theta", 10000.0),
        experimental_attention_variant="dsa",
        dsa_indexer_n_heads=hf["index_n_heads"],
        dsa_indexer_head_dim=hf["index_head_dim"],
        dsa_indexer_topk=hf["index_topk"],
        dsa_indexer_loss_coeff=0.0,  # the indexer is frozen in RL (glm5_model/dsa.py)
        **_moe_and_parallel_fields(hf, layout, params_dtype, bias_update_rate, grouped_experts),
    )
