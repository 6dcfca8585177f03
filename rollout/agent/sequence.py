"""One agent episode as one token sequence: the prompt, then model turns and environment observations in order,
with a loss mask that is 1 exactly on the tokens the model generated."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """Tokens [start, end) of the response (offsets after the prompt); `turn` counts model turns from 0, an
    observation span carries the turn it answers."""

    start: int
    end: int
    turn: int
    source: str  # "model" or "env"


@dataclass
class TokenSequence:
    """`response_*` are per token after the prompt, in the shape rollout.sample.Sample keeps them.
    Observation tokens have logprob 0.0 and the policy version of the turn they answer (so staleness metrics are
    not skewed by them); the loss mask keeps them out of the loss."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    response_logprobs: list[float] = field(default_factory=list)
    response_versions: list[int] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def model_turns(self) -> int:
        return sum(s.source == "model" for s in self.spans)

    def add_model(self, ids: list[int], logprobs: list[float] | None = None,
                  versions: list[int] | int = 0) -> Span:
        logprobs = [0.0] * len(ids) if logprobs is None else list(logprobs)
        versions = [versions] * len(ids) if isinstance(versions, int) else list(versions)
        if not len(ids) == len(logprobs) == len(versions):
            raise ValueError(f"model turn {self.model_turns}: {len(ids)} tokens, {len(logprobs)} logprobs, "
                             f"{len(versions)} versions")
        span = self._append(ids, 1, "model", self.model_turns)
        self.response_logprobs.extend(logprobs)
        self.response_versions.extend(versions)
        return span

    def add_observation(self, ids: list[int]) -> Span:
        if not self.spans or self.spans[-1].source != "model":
            raise ValueError("an observation follows a model turn")
        version = self.response_versions[-1] if self.response_versions else 0
        span = self._append(ids, 0, "env", self.spans[-1].turn)
        self.response_logprobs.extend([0.0] * len(ids))
        self.response_versions.extend([version] * len(ids))
        return span

    def turn_of_token(self) -> list[int]:
        """The model turn each response token belongs to or answers (for turn-level reward attribution)."""
        out = []
        for span in self.spans:
            out.extend([span.turn] * (span.end - span.start))
        return out

    def _append(self, ids: list[int], mask: int, source: str, turn: int) -> Span:
        start = len(self.response_ids)
        self.response_ids.extend(ids)
        self.loss_mask.extend([mask] * len(ids))
        span = Span(start, len(self.response_ids), turn, source)
        self.spans.append(span)
        return span
