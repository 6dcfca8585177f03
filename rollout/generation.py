"""Driver-side rollout: prompts -> groups of samples from the engines -> rewards.

Engines are `rollout.engine.RolloutEngineActor` handles; each group goes to one engine so its shared prompt
prefix is cached once."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import ray

from rewards import RewardInput, RewardRunner
from rollout.data import PromptRow
from rollout.sample import Sample, SampleStatus

log = logging.getLogger(__name__)

_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # generate the whole budget (benchmarks, tests that need long requests)

    def as_sglang(self, max_new_tokens: int | None = None) -> dict:
        params = {"max_new_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                  "temperature": self.temperature, "top_p": self.top_p, "stop_token_ids": list(self.stop_token_ids)}
        if self.ignore_eos:
            params["ignore_eos"] = True
        return params


def make_group(row: PromptRow, prompt_ids: list[int], group_id: int, group_size: int) -> list[Sample]:
    """The `group_size` (not yet generated) samples of one prompt."""
    return [Sample(prompt_ids=list(prompt_ids), group_id=group_id, index_in_group=k, prompt=row.messages,
                   label=row.label, metadata={"row": row.index, **row.metadata})
            for k in range(group_size)]


def apply_result(sample: Sample, out: dict, decode: Callable[[list[int]], str] | None = None) -> None:
    """Appends an engine result to the sample's response (a resumed sample keeps the tokens it had) and sets its
    status from the finish reason. A response generated in several pieces gets its text from `decode` when
    given (decoding the pieces separately can split a character), else the pieces' texts joined."""
    if len(out["output_ids"]) != len(out["output_logprobs"]):
        raise RuntimeError(f"engine returned {len(out['output_ids'])} tokens but "
                           f"{len(out['output_logprobs'])} logprobs for group {sample.group_id}/{sample.index_in_group}")
    resumed = sample.response_length > 0
    sample.append_response(out["output_ids"], out["output_logprobs"], out["weight_version"])
    if not resumed:
        sample.response_text = out["text"]
    else:
        sample.response_text = decode(sample.response_ids) if decode else sample.response_text + out["text"]
    sample.status = _STATUS.get(out["finish_reason"], SampleStatus.COMPLETED)


def generate_groups(engines: list, rows: list[PromptRow], prompt_ids: list[list[int]], group_size: int,
                    settings: SamplingSettings, first_group_id: int = 0) -> list[Sample]:
    """`group_size` samples per prompt, laid out group after group; each carries the weight version that
    generated it (per token) and its behaviour logprobs."""
    samples = [s for g, (row, ids) in enumerate(zip(rows, prompt_ids))
               for s in make_group(row, ids, first_group_id + g, group_size)]
    per_engine: list[list[Sample]] = [[] for _ in engines]
    for s in samples:
        per_engine[(s.group_id - first_group_id) % len(engines)].append(s)
    params = settings.as_sglang()
    calls = [(engine, batch, engine.generate.remote([{"input_ids": s.prompt_ids, "sampling_params": params}
                                                     for s in batch]))
             for engine, batch in zip(engines, per_engine) if batch]
    for _, batch, ref in calls:
        for s, out in zip(batch, ray.get(ref)):
            apply_result(s, out)
    return samples


def score_samples(samples: list[Sample], runner: RewardRunner) -> None:
    """Fills `reward` and `reward_components`; a failing plugin costs a sample its score (the runner's fallback),
    never the run."""
    inputs = [RewardInput(prompt=s.prompt, response=s.response_text, label=s.label, metadata=s.metadata)
              for s in samples]
    ids = [f"{s.group_id}/{s.index_in_group} (row {s.metadata.get('row')})" for s in samples]
    for sample, result in zip(samples, runner.score_many_sync(inputs, ids)):
        sample.reward, sample.reward_components = result.score, dict(result.components)
