"""HF-format configs (transformers model type `glm_moe_dsa`) for each model size we support."""
from glm5_model.presets.configs import PRESETS, preset_config

__all__ = ["PRESETS", "preset_config"]
