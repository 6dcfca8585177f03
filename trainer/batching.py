"""Turns rollout samples into padded, equally shaped per-rank micro-batches.

Every data-parallel rank must run the same number of micro-batches of the same shape: MoE token dispatch
all-gathers activations across the expert-parallel group, so a rank with a different shape (or one fewer
micro-batch) would deadlock or fail inside the collective. Dummy rows carry an all-zero loss mask."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class TrainItem:
    """What a training rank needs of one sample. Per response token (tokens[prompt_len:]): the behaviour logprob
    (what the engine sampled it with), the weight version that generated it, whether it counts in the loss, and,
    when the batch is trained in several optimizer steps, the proximal logprob (the trainer's, before the step).

    Multi-turn (agent) samples interleave the model's turns with environment observations: `model_mask` is 1 on
    the model's tokens only (observations are never trained and never counted in the logprob metrics), and
    `token_advantages` may give each token its own advantage (turn-level attribution) instead of `advantage`."""

    tokens: list[int]
    prompt_len: int
    advantage: float
    rollout_logprobs: list[float]
    rollout_versions: list[int] | None = None  # None: all of the current version
    loss_mask: list[float] | None = None       # None: every model token counts
    prox_logprobs: list[float] | None = None   # None: the current policy at the gradient (one optimizer step)
    model_mask: list[int] | None = None        # None: every response token is the model's
    token_advantages: list[float] | None = None
    weight: float = 1.0  # how many identical samples this row stands for (compact_items)

    def __post_init__(self) -> None:
        n_resp = len(self.tokens) - self.prompt_len
        if self.prompt_len < 1 or n_resp < 0:
            raise ValueError(f"bad sample: prompt_len {self.prompt_len} for {len(self.tokens)} tokens")
        for name in ("rollout_logprobs", "rollout_versions", "loss_mask", "prox_logprobs", "model_mask",
                     "token_advantages"):
            values = getattr(self, name)
            if values is not None and len(values) != n_resp:
                raise ValueError(f"bad sample: {n_resp} response tokens but {len(values)} {name}")


@dataclass
class MicroBatch:
    tokens: torch.Tensor            # [b, s] int64
    loss_mask: torch.Tensor         # [b, s-1] 1.0 where target token s+1 is a trained response token of a real row
    response_mask: torch.Tensor     # [b, s-1] 1.0 on every model token of a real row (loss-masked ones too)
    advantages: torch.Tensor        # [b, s-1] the row's advantage broadcast over its tokens
    rollout_logprobs: torch.Tensor  # [b, s-1] behaviour logprobs aligned with targets (0 where masked)
    versions: torch.Tensor          # [b, s-1] int64 weight version of each response token (-1 elsewhere)
    prox_logprobs: torch.Tensor | None  # [b, s-1] proximal logprobs, when every item has them
    real_rows: int                  # rows before padding

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(self.tokens.to(device), self.loss_mask.to(device), self.response_mask.to(device),
                          self.advantages.to(device), self.rollout_logprobs.to(device), self.versions.to(device),
                          None if self.prox_logprobs is None else self.prox_logprobs.to(device), self.real_rows)


def shard_items(items: list[TrainItem], dp_size: int) -> list[list[TrainItem]]:
    """Round-robin split over data-parallel ranks, so long and short groups spread over ranks."""
    return [items[r::dp_size] for r in range(dp_size)]


@dataclass(frozen=True)
class BatchShape:
    num_micro: int  # micro-batches per rank
    rows: int       # rows per micro-batch
    seq_len: int    # the longest padded length (the pipeline's fixed activation shape)
    micro_seq_lens: tuple[int, ...] = ()  # padded length of each micro-batch (the same on every rank)

    def micro_len(self, m: int) -> int:
        return self.micro_seq_lens[m] if self.micro_seq_lens else self.seq_len


def plan_shape(items: list[TrainItem], dp_size: int, micro_batch_size: int, seq_multiple: int = 1,
               uniform: bool = False) -> BatchShape:
    """The shape every rank uses for this batch. Micro-batch m of each rank (its share is items[rank::dp_size])
    holds items[dp_size * m * rows : dp_size * (m + 1) * rows]; it is padded to the longest of those -- the same
    length on every rank, so collectives across ranks (expert parallelism) see equal shapes -- rounded up to a
    multiple of `seq_multiple` (the tensor-parallel size under sequence parallelism). Items given longest first
    (longest_first) make micro-batches of similar lengths and little padding. `uniform`: every micro-batch gets the
    batch's longest length (pipeline parallelism sends fixed-shape activations between stages)."""
    if not items:
        raise ValueError("no samples to train on")
    per_rank = math.ceil(len(items) / dp_size)
    rows = min(micro_batch_size, per_rank)
    num_micro = math.ceil(per_rank / rows)
    lengths = [len(it.tokens) for it in items]
    padded = [math.ceil(max(lengths[dp_size * m * rows:dp_size * (m + 1) * rows]) / seq_multiple) * seq_multiple
              for m in range(num_micro)]
    longest = max(padded)
    return BatchShape(num_micro, rows, longest, tuple([longest] * num_micro if uniform else padded))


def longest_first(items: list[TrainItem]) -> list[int]:
    """The order that sorts items longest first (stable): positions into `items`."""
    return sorted(range(len(items)), key=lambda i: -len(items[i].tokens))


def make_micro_batches(items: list[TrainItem], shape: BatchShape, pad_id: int = 0,
                       current_version: int = 0) -> list[MicroBatch]:
    batches = []
    rows = shape.rows
    with_prox = bool(items) and all(it.prox_logprobs is not None for it in items)
    for m in range(shape.num_micro):
        chunk, seq_len = items[m * rows:(m + 1) * rows], shape.micro_len(m)
        tokens = torch.full((rows, seq_len), pad_id, dtype=torch.long)
        mask, response = torch.zeros(rows, seq_len - 1), torch.zeros(rows, seq_len - 1)
        adv = torch.zeros(rows, seq_len - 1)
        behaviour = torch.zeros(rows, seq_len - 1)
        versions = torch.full((rows, seq_len - 1), -1, dtype=torch.long)
        prox = torch.zeros(rows, seq_len - 1) if with_prox else None
        for i, it in enumerate(chunk):
            n = len(it.tokens)
            tokens[i, :n] = torch.tensor(it.tokens)
            # target position t predicts tokens[t+1]; response tokens are tokens[prompt_len:n]
            lo, hi = it.prompt_len - 1, n - 1
            response[i, lo:hi] = 1.0 if it.model_mask is None else torch.tensor(it.model_mask, dtype=torch.float32)
            response[i, lo:hi] *= it.weight
            mask[i, lo:hi] = response[i, lo:hi] if it.loss_mask is None else \
                response[i, lo:hi] * torch.tensor(it.loss_mask, dtype=torch.float32)
            adv[i, lo:hi] = it.advantage if it.token_advantages is None else \
                torch.tensor(it.token_advantages, dtype=torch.float32)
            behaviour[i, lo:hi] = torch.tensor(it.rollout_logprobs, dtype=torch.float32)
            versions[i, lo:hi] = current_version if it.rollout_versions is None else torch.tensor(it.rollout_versions)
            if prox is not None:
                prox[i, lo:hi] = torch.tensor(it.prox_logprobs, dtype=torch.float32)
        batches.append(MicroBatch(tokens, mask, response, adv, behaviour, versions, prox, len(chunk)))
    return batches


def compact_items(items: list[TrainItem], keep_at_least: int = 1) -> list[TrainItem]:
    """The rows a training step has to run for the same gradient. Identical samples (same tokens, advantages,
    masks, behaviour logprobs and versions: GRPO groups of a confident policy are mostly copies) become one row
    weighing as many; rows whose every advantage is 0 are left out, their loss and gradient being exactly 0 (the
    caller still counts their tokens in the loss normaliser). At least `keep_at_least` rows stay, zero-advantage
    ones contributing nothing, since every data-parallel rank needs a row and the optimizer step must still be
    taken (Adam moves the weights on a zero gradient too)."""
    merged: dict[tuple, TrainItem] = {}
    for it in items:
        key = _identity(it)
        seen = merged.get(key)
        merged[key] = it if seen is None else dataclasses.replace(seen, weight=seen.weight + it.weight)
    rows = list(merged.values())
    kept = [it for it in rows if not _zero_advantage(it)]
    fillers = sorted((it for it in rows if _zero_advantage(it)), key=lambda it: len(it.tokens))
    return kept + fillers[:max(0, keep_at_least - len(kept))]


def _identity(it: TrainItem) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v
                 for v in (getattr(it, f.name) for f in dataclasses.fields(it) if f.name != "weight"))


def _zero_advantage(it: TrainItem) -> bool:
    return all(a == 0.0 for a in (it.token_advantages if it.token_advantages is not None else [it.advantage]))


def train_items(samples: list, advantages: list[float | list[float]], train_version: int,
                max_age: int | None = None) -> list[TrainItem]:
    """TrainItems from a rollout batch's samples (rollout.sample.Sample, group after group) and their advantages
    (one per sample, or one per response token), with each token's behaviour logprob and version; tokens more
    than `max_age` versions older than `train_version` get loss mask 0, and a multi-turn sample's observation
    tokens are not the model's (its response_mask). Samples with no model tokens carry no loss and are left out."""
    items = []
    for s, adv in zip(samples, advantages):
        if s.model_tokens == 0:
            continue
        mask = None if max_age is None else [float(train_version - v <= max_age) for v in s.response_versions]
        per_token = isinstance(adv, (list, tuple))
        items.append(TrainItem(s.tokens, len(s.prompt_ids), 0.0 if per_token else float(adv),
                               list(s.response_logprobs), list(s.response_versions), mask,
                               model_mask=None if s.response_mask is None else list(s.response_mask),
                               token_advantages=[float(a) for a in adv] if per_token else None))
    return items
