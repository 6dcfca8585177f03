"""GLM-5 (GlmMoeDsaForCausalLM, MLA + DeepSeek Sparse Attention) and GLM-4.5 (Glm4MoeForCausalLM): the
architectures glm5_model's presets and HF conversion write (see rollout/sglang_models/__init__.py)."""
from sglang.srt.models.glm4_moe import EntryClass  # noqa: F401 (SGLang's registry reads the name)
