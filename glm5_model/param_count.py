"""Analytic parameter counts for HF-format GLM configs: GLM-5 (`glm_moe_dsa`) and GLM-4.5 (`glm4_moe`).

Counts follow the modules transformers builds (GlmMoeDsaForCausalLM / Glm4MoeForCausalLM), tensor by tensor, so
`total` equals `sum(p.numel() for p in model.parameters())` of those classes exactly (tests check it on the meta
device). Conventions:

* `total` counts trainable parameters. The MoE selection bias (`e_score_correction_bias`, Megatron's
  `expert_bias`) is a buffer in both transformers and Megatron: it is reported as `buffers`, not in `total`
  (it is in the checkpoint: `total + buffers` = the numel of the HF state dict).
* `active` = every parameter a token touches: `total` minus all routed experts, plus `num_experts_per_tok` routed
  experts in each MoE layer. Embedding and lm_head are included (one embedding row is read per token, but the
  convention used for the published "~40B active" figures counts the whole matrix).
* Multi-token-prediction (MTP / "nextn") layers are not built by transformers and are not in `total`; the count of
  the MTP module(s) a checkpoint carries (`num_nextn_predict_layers`) is reported separately as `mtp`
  (one more decoder layer plus enorm, hnorm, eh_proj and the shared-head norm; it shares embedding and lm_head).

Each decoder layer is also split the way Megatron shards it (see `LayerParams`), for the memory planner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("glm_moe_dsa", "glm4_moe")


@dataclass(frozen=True)
class LayerParams:
    """One decoder layer, grouped by how Megatron shards it.

    attention_tp: attention matrices split across tensor parallel ranks (MLA: q_up, kv_up, out; GQA: qkv, out and
        the qkv bias).
    attention_replicated: duplicated on every TP rank (the two norms, MLA's q/kv down projections and latent norms,
        GQA's q/k norms, the DSA indexer).
    indexer: the DSA indexer's share of attention_replicated (wq_b, wk, k_norm weight+bias, weights_proj).
    mlp_tp: dense MLP (dense layers) or shared expert(s) (MoE layers); split across TP.
    router: the MoE router weight (replicated).
    routed_experts: all routed experts of the layer (split across EP, then expert-TP).
    per_expert: one routed expert (gate, up, down).
    expert_bias: the selection-bias buffer (not a parameter).
    """

    index: int
    moe: bool
    attention_tp: int
    attention_replicated: int
    indexer: int
    mlp_tp: int
    router: int
    routed_experts: int
    per_expert: int
    expert_bias: int

    @property
    def total(self) -> int:
        return self.attention_tp + self.attention_replicated + self.mlp_tp + self.router + self.routed_experts


@dataclass(frozen=True)
class ModelParams:
    model_type: str
    embedding: int
    lm_head: int
    final_norm: int
    layers: list[LayerParams] = field(default_factory=list)
    top_k: int = 0
    mtp: int = 0

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.final_norm + sum(l.total for l in self.layers)

    @property
    def routed_experts(self) -> int:
        return sum(l.routed_experts for l in self.layers)

    @property
    def active(self) -> int:
        return self.total - self.routed_experts + sum(self.top_k * l.per_expert for l in self.layers if l.moe)

    @property
    def buffers(self) -> int:
        return sum(l.expert_bias for l in self.layers)

    def groups(self) -> dict[str, int]:
        """Named totals for printing; they sum to `total`."""
        ls = self.layers
        return {
            "embedding": self.embedding,
            "attention (TP-split)": sum(l.attention_tp for l in ls),
            "attention (replicated: norms, down-proj, latent norms)": sum(
                l.attention_replicated - l.indexer for l in ls),
            "DSA indexer": sum(l.indexer for l in ls),
            "dense MLP": sum(l.mlp_tp for l in ls if not l.moe),
            "shared experts": sum(l.mlp_tp for l in ls if l.moe),
            "routers": sum(l.router for l in ls),
            "routed experts": self.routed_experts,
            "final norm": self.final_norm,
            "lm_head": self.lm_head,
        }


def _mlp_types(hf: dict[str, Any]) -> list[str]:
    n = hf["num_hidden_layers"]
    types = hf.get("mlp_layer_types")
    if types is None:
        k = min(hf.get("first_k_dense_replace", 0), n)
        types = ["dense"] * k + ["sparse"] * (n - k)
    if len(types) != n:
        raise ValueError(f"mlp_layer_types has {len(types)} entries for num_hidden_layers={n}")
    return list(types)


def indexer_types(hf: dict[str, Any]) -> list[str]:
    """Which GLM-5 layers build their own DSA indexer ("full") or reuse the previous one's top-k ("shared"); the
    same rule as transformers' GlmMoeDsaConfig (index_topk_pattern, else index_topk_freq/index_skip_topk_offset)."""
    n = hf["num_hidden_layers"]
    types = hf.get("indexer_types")
    if types is None:
        pattern = hf.get("index_topk_pattern")
        if pattern is not None:
            types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
        else:
            freq = max(hf.get("index_topk_freq", 1), 1)
            offset = hf.get("index_skip_topk_offset", 2)
            types = ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(n)]
    return list(types)


def _ffn(hidden: int, inner: int) -> int:
    return 3 * hidden * inner  # gate, up, down (SwiGLU), no bias


def _attention_glm5(hf: dict[str, Any], full_indexer: bool) -> tuple[int, int, int]:
    h, nh = hf["hidden_size"], hf["num_attention_heads"]
    q_lora, kv_lora = hf["q_lora_rank"], hf["kv_lora_rank"]
    if q_lora is None:
        raise ValueError("q_lora_rank: None (direct q projection) is not a GLM-5 layout")
    nope, rope, v = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
    bias = bool(hf.get("attention_bias", False))
    split = (q_lora * nh * (nope + rope)          # q_b_proj
             + kv_lora * nh * (nope + v)          # kv_b_proj
             + nh * v * h + (h if bias else 0))   # o_proj
    replicated = (2 * h                                           # input / post-attention RMSNorm
                  + h * q_lora + (q_lora if bias else 0) + q_lora  # q_a_proj, q_a_layernorm
                  + h * (kv_lora + rope) + ((kv_lora + rope) if bias else 0) + kv_lora)  # kv_a_proj, kv_a_layernorm
    indexer = 0
    if full_indexer:
        ih, idim = hf["index_n_heads"], hf["index_head_dim"]
        indexer = (q_lora * ih * idim   # wq_b
                   + h * idim           # wk
                   + 2 * idim           # k_norm (LayerNorm weight + bias)
                   + h * ih)            # weights_proj
    return split, replicated + indexer, indexer


def _attention_glm4(hf: dict[str, Any]) -> tuple[int, int, int]:
    h, nh, nkv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or h // nh
    bias = bool(hf.get("attention_bias", False))
    qkv_out = (nh + 2 * nkv) * hd
    split = h * qkv_out + (qkv_out if bias else 0) + nh * hd * h  # q/k/v (+bias), o_proj (never biased)
    replicated = 2 * h + (2 * hd if hf.get("use_qk_norm", False) else 0)
    return split, replicated, 0


def count_params(hf: dict[str, Any]) -> ModelParams:
    model_type = hf.get("model_type", "glm_moe_dsa")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type: {model_type!r} is not supported (known: {list(SUPPORTED_MODEL_TYPES)})")
    h, vocab = hf["hidden_size"], hf["vocab_size"]
    n_experts, top_k = hf["n_routed_experts"], hf["num_experts_per_tok"]
    per_expert = _ffn(h, hf["moe_intermediate_size"])
    shared = _ffn(h, hf["moe_intermediate_size"] * hf.get("n_shared_experts", 1)) if hf.get("n_shared_experts", 1) else 0
    layer_indexers = indexer_types(hf) if model_type == "glm_moe_dsa" else None

    def layer(i: int, moe: bool, full_indexer: bool | None = None) -> LayerParams:
        if model_type == "glm_moe_dsa":
            if full_indexer is None:
                full_indexer = layer_indexers[i] == "full"
            split, replicated, indexer = _attention_glm5(hf, full_indexer)
        else:
            split, replicated, indexer = _attention_glm4(hf)
        return LayerParams(
            index=i, moe=moe, attention_tp=split, attention_replicated=replicated, indexer=indexer,
            mlp_tp=shared if moe else _ffn(h, hf["intermediate_size"]),
            router=n_experts * h if moe else 0,
            routed_experts=n_experts * per_expert if moe else 0,
            per_expert=per_expert if moe else 0,
            expert_bias=n_experts if moe else 0,
        )

    layers = [layer(i, t == "sparse") for i, t in enumerate(_mlp_types(hf))]
    n_mtp = int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)
    mtp = 0
    if n_mtp:
        # enorm + hnorm + eh_proj (2h -> h) + shared_head.norm, and one MoE decoder layer (own indexer for GLM-5).
        extra = layer(len(layers), True, full_indexer=True)
        mtp = n_mtp * (3 * h + 2 * h * h + extra.total)
    return ModelParams(
        model_type=model_type,
        embedding=vocab * h,
        lm_head=0 if hf.get("tie_word_embeddings", False) else vocab * h,
        final_norm=h,
        layers=layers,
        top_k=top_k,
        mtp=mtp,
    )
