"""One rollout sample: what the engine generated, with what policy, and how it was scored."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class SampleStatus(str, enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"      # stopped on a stop token
    TRUNCATED = "truncated"      # hit max_new_tokens
    ABORTED = "aborted"          # stopped by an abort; keeps its partial response for resumption
    ENV = "env"                  # a multi-turn sample whose environment is resetting or answering a turn


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
    # Total response budget of this sample; None means the run's max_new_tokens. Kept on the sample so a
    # resumed response gets exactly the budget it has left.
    max_new_tokens: int | None = None
    response_ids: list[int] = field(default_factory=list)
    response_logprobs: list[float] = field(default_factory=list)
    response_versions: list[int] = field(default_factory=list)
    response_text: str = ""
    # Multi-turn (agent) samples: the response interleaves model turns and environment observations; the loss
    # mask is 1 exactly on the model's tokens. None (single-turn): every response token is the model's.
    multi_turn: bool = False
    response_mask: list[int] | None = None
    status: SampleStatus = SampleStatus.PENDING
    reward: float | None = None
    reward_components: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"sample group {self.group_id}/{self.index_in_group}: empty prompt_ids")
        if self.multi_turn and self.response_mask is None:
            self.response_mask = [1] * len(self.response_ids)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    @property
    def finished(self) -> bool:
        """Done generating: stopped, or used its whole budget. Aborted and pending samples still have work."""
        return self.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED)

    @property
    def oldest_version(self) -> int | None:
        return min(self.response_versions) if self.response_versions else None

    def reset_response(self) -> None:
        """Back to the bare prompt, to be generated again from scratch."""
        self.response_ids, self.response_logprobs, self.response_versions = [], [], []
        self.response_mask = [] if self.multi_turn else None
        self.response_text, self.status = "", SampleStatus.PENDING
        self.reward, self.reward_components = None, {}

    def append_response(self, ids: list[int], logprobs: list[float], versions: list[int] | int) -> None:
        """Appends generated tokens with their behaviour logprobs and the weight version of each (one int: all)."""
        versions = [versions] * len(ids) if isinstance(versions, int) else list(versions)
        if not len(ids) == len(logprobs) == len(versions):
            raise ValueError(f"sample group {self.group_id}/{self.index_in_group}: "
                             f"{len(ids)} tokens, {len(logprobs)} logprobs, {len(versions)} versions")
        self.response_ids.extend(ids)
        self.response_logprobs.extend(logprobs)
        self.response_versions.extend(versions)
        if self.multi_turn:
            self.response_mask = (self.response_mask or []) + [1] * len(ids)

    def append_observation(self, ids: list[int]) -> None:
        """Environment tokens after a model turn: no loss, logprob 0, the version of the turn they answer."""
        if not self.multi_turn:
            raise ValueError(f"sample {self.key}: observations only follow turns of multi-turn samples")
        version = self.response_versions[-1] if self.response_versions else 0
        self.response_ids.extend(ids)
        self.response_logprobs.extend([0.0] * len(ids))
        self.response_versions.extend([version] * len(ids))
        self.response_mask = (self.response_mask or []) + [0] * len(ids)

    @property
    def model_tokens(self) -> int:
        return self.response_length if self.response_mask is None else sum(self.response_mask)

    @property
    def key(self) -> str:
        return f"{self.group_id}/{self.index_in_group}"


def sample_to_dict(sample: Sample) -> dict[str, Any]:
    """Plain JSON-serialisable data (the status as its string value); `prompt`, `label` and `metadata` must be
    JSON-serialisable themselves, which rows from the data loader are."""
    d = dataclasses.asdict(sample)
    d["status"] = sample.status.value
    return d


def sample_from_dict(data: dict[str, Any]) -> Sample:
    names = {f.name for f in dataclasses.fields(Sample)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"sample dict has unknown fields {unknown}")
    fields = dict(data)
    fields["status"] = SampleStatus(fields.get("status", SampleStatus.PENDING.value))
    sample = Sample(**fields)
    if sample.response_mask is not None and len(sample.response_mask) != len(sample.response_ids):
        raise ValueError(f"sample group {sample.group_id}/{sample.index_in_group}: {len(sample.response_ids)} "
                         f"tokens but {len(sample.response_mask)} mask entries")
    if not len(sample.response_ids) == len(sample.response_logprobs) == len(sample.response_versions):
        raise ValueError(f"sample group {sample.group_id}/{sample.index_in_group}: {len(sample.response_ids)} "
                         f"tokens, {len(sample.response_logprobs)} logprobs, {len(sample.response_versions)} versions")
    return sample
