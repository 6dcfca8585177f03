"""An outside author's plugin, loaded by dotted path in tests."""
from rewards import RewardInput, RewardResult


async def always_half(sample: RewardInput) -> RewardResult:
    return RewardResult(0.5, info={"response_chars": len(sample.response)})
