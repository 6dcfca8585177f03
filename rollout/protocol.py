"""The typed contract between the rollout manager and an engine: one request in, one result out.

Token ids only (text is never sent: tokenizers can disagree between libraries). A result carries, per generated
token, the behaviour logprob (under the distribution it was sampled from: SGLang applies the temperature, not
top-p/top-k) and the weight version that produced it, so a request that spans a weight update reports exactly
which tokens came from which policy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class EngineRequest:
    rid: str
    input_ids: list[int]
    sampling: dict[str, Any] = field(default_factory=dict)  # SGLang sampling params (max_new_tokens, temperature...)

    def __post_init__(self) -> None:
        if not self.input_ids:
            raise ValueError(f"request {self.rid}: empty input_ids")


@dataclass(frozen=True)
class EngineResult:
    rid: str
    output_ids: list[int]
    output_logprobs: list[float]
    output_versions: list[int]
    finish_reason: str  # one of FINISH_REASONS; "abort" keeps the tokens generated before the abort
    text: str = ""

    def __post_init__(self) -> None:
        if not len(self.output_ids) == len(self.output_logprobs) == len(self.output_versions):
            raise ValueError(f"result {self.rid}: {len(self.output_ids)} tokens, {len(self.output_logprobs)} "
                             f"logprobs, {len(self.output_versions)} versions")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"result {self.rid}: finish_reason {self.finish_reason!r} not in {FINISH_REASONS}")

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"


def versions_from_spans(spans: list[dict] | None, num_tokens: int, fallback: int) -> list[int]:
    """Per-token weight versions from SGLang's `meta_info["weight_versions"]` spans ({version, start, end}, the
    scheduler's record of which tokens each weight version produced); tokens no span covers, or versions that are
    not ours (SGLang's initial "default"), get `fallback`."""
    out = [fallback] * num_tokens
    for span in spans or []:
        try:
            version = int(span["version"])
        except (TypeError, ValueError):
            continue
        for i in range(max(0, int(span["start"])), min(num_tokens, int(span["end"]))):
            out[i] = version
    return out


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    reason: str = ""
    in_flight: int = 0
    version: int = 0
