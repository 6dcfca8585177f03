"""Sampling settings, the samples of one prompt group, and scoring them with the reward runner."""
from __future__ import annotations

from dataclasses import dataclass

from rewards import RewardInput, RewardRunner
from rollout.data import PromptRow
from rollout.sample import Sample


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # generate the whole budget (benchmarks, tests that need long requests)

    def as_sglang(self, max_new_tokens: int | None = None) -> dict:
        params = {"max_new_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                  "temperature": self.temperature, "top_p": self.top_p, "stop_token_ids": list(self.stop_token_ids)}
        if self.ignore_eos:
            params["ignore_eos"] = True
        return params


def make_group(row: PromptRow, prompt_ids: list[int], group_id: int, group_size: int,
               epoch: int = 0) -> list[Sample]:
    """The `group_size` (not yet generated) samples of one prompt; metadata names the row (and the epoch it was
    served in) so a run's trained prompts can be audited."""
    meta = {"row": row.index, "epoch": epoch, "task": row.task, **row.metadata}
    return [Sample(prompt_ids=list(prompt_ids), group_id=group_id, index_in_group=k, prompt=row.messages,
                   label=row.label, metadata=dict(meta), multi_turn=is_agent_row(row))
            for k in range(group_size)]


def is_agent_row(row: PromptRow) -> bool:
    """Whether the row is an episode of an environment (its label names one; rollout/agent runs it)."""
    return isinstance(row.label, dict) and "env" in row.label


def score_samples(samples: list[Sample], runner: RewardRunner) -> list[tuple[float, dict[str, float]]]:
    """(score, components) per sample; a failing plugin costs a sample its score (the runner's fallback), never
    the run."""
    inputs = [RewardInput(prompt=s.prompt, response=s.response_text, label=s.label, metadata=s.metadata)
              for s in samples]
    ids = [f"{s.key} (row {s.metadata.get('row')})" for s in samples]
    return [(r.score, dict(r.components)) for r in runner.score_many_sync(inputs, ids)]
