"""GLM-5 architecture as a Megatron-core model, presets, and HF checkpoint conversion. Imports nothing from trainer/, rollout/ or rewards/."""
