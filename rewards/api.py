"""The reward plugin contract: `async def reward(sample: RewardInput, **kwargs) -> RewardResult`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


@dataclass(frozen=True)
class RewardInput:
    """What a reward sees of one rollout sample.

    `prompt` is the chat messages (list of {"role", "content"}) or a plain string; `response` is the decoded
    completion; `label` is whatever the dataset row carried for the reward (a reference answer, unit tests...).
    """

    prompt: Any
    response: str
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardResult:
    score: float
    components: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.score, bool) or not isinstance(self.score, (int, float)):
            raise TypeError(f"RewardResult.score must be a real number, got {type(self.score).__name__}")
        if not math.isfinite(self.score):
            raise ValueError(f"RewardResult.score must be finite, got {self.score}")
        self.score = float(self.score)
        for name, value in self.components.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RewardResult.components[{name!r}] must be a finite number, got {value!r}")


RewardFn = Callable[..., Awaitable[RewardResult]]
