"""One rollout sample: what the engine generated, with what policy, and how it was scored."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SampleStatus(str, enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"      # stopped on a stop token
    TRUNCATED = "truncated"      # hit max_new_tokens
    ABORTED = "aborted"          # stopped by an abort; keeps its partial response for resumption


@dataclass
class Sample:
    """A prompt and (possibly partial) response.

    `response_logprobs[i]` is the behaviour policy's logprob of `response_ids[i]`, and `response_versions[i]` is
    the weight version that generated it, so a response resumed after a weight update carries tokens of several
    policies and the trainer can correct or mask them.
    """

    prompt_ids: list[int]
    group_id: int
    index_in_group: int
    prompt: Any = None                      # chat messages or text, for rewards and logs
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    response_ids: list[int] = field(default_factory=list)
    response_logprobs: list[float] = field(default_factory=list)
    response_versions: list[int] = field(default_factory=list)
    response_text: str = ""
    status: SampleStatus = SampleStatus.PENDING
    reward: float | None = None
    reward_components: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"sample group {self.group_id}/{self.index_in_group}: empty prompt_ids")

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    def append_response(self, ids: list[int], logprobs: list[float], version: int) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"sample group {self.group_id}/{self.index_in_group}: "
                             f"{len(ids)} tokens but {len(logprobs)} logprobs")
        self.response_ids.extend(ids)
        self.response_logprobs.extend(logprobs)
        self.response_versions.extend([version] * len(ids))
