"""The Megatron GLM-5 built from an HF checkpoint on one in-process rank: the reference tests compare against."""
from __future__ import annotations

import json

import torch

from glm5_model.convert import ExpertShard, load_hf_into_megatron
from glm5_model.hf_checkpoint import load_hf_state_dict
from glm5_model.model import build_gpt_model


def megatron_from_checkpoint(checkpoint, hf_overrides: dict | None = None) -> torch.nn.Module:
    """Needs Megatron's parallel state initialised (world size 1); `hf_overrides` change config.json's fields."""
    hf_config = {**json.loads((checkpoint / "config.json").read_text()), **(hf_overrides or {})}
    model = build_gpt_model(hf_config)
    load_hf_into_megatron(model, load_hf_state_dict(checkpoint), ExpertShard.for_rank(hf_config))
    return model.eval()
