"""Rewards that need no labels: useful for smoke runs on random tiny models and as plugin examples."""
from __future__ import annotations

from rewards.api import RewardInput, RewardResult
from rewards.registry import register_reward

_EXAMPLE_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@register_reward("char_fraction", examples=[RewardInput(_EXAMPLE_PROMPT, "Paris, I believe."),
                                           RewardInput(_EXAMPLE_PROMPT, "")])
async def char_fraction(sample: RewardInput, *, chars: str = "aeiou") -> RewardResult:
    """Share of the response's characters that are in `chars`: a dense signal a random policy can climb."""
    text = sample.response
    if not text:
        return RewardResult(0.0, {"length": 0.0, "hits": 0.0})
    hits = sum(ch in chars for ch in text)
    return RewardResult(hits / len(text), {"length": float(len(text)), "hits": float(hits)})


@register_reward("exact_match", examples=[RewardInput(_EXAMPLE_PROMPT, "Paris", label="Paris"),
                                         RewardInput(_EXAMPLE_PROMPT, "Lyon", label="Paris")])
async def exact_match(sample: RewardInput, *, strip: bool = True) -> RewardResult:
    """1 when the response equals the label (after stripping white space), else 0."""
    if sample.label is None:
        raise ValueError("exact_match needs a label on every sample")
    response, label = sample.response, str(sample.label)
    if strip:
        response, label = response.strip(), label.strip()
    return RewardResult(float(response == label))
