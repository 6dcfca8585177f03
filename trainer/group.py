"""A group of Megatron training ranks (Ray actors) behind one object with one call per RL stage."""
from __future__ import annotations

import dataclasses
from typing import Any

import ray

from glm5_model.parallel import free_port
from trainer.actor import TrainRank
from trainer.batching import TrainItem, compact_items, longest_first, plan_shape, shard_items
from trainer.config import TrainerConfig

TrainRankActor = ray.remote(TrainRank)
_PORT_ATTEMPTS = 3


class TrainerGroup:
    def __init__(self, cfg: TrainerConfig, checkpoint_dir: str, layer_spec: str = "auto", temperature: float = 1.0):
        self.cfg = cfg
        # The engines' sampling temperature: the trainer's logprobs must be of the distribution they sampled from.
        rank_cfg = {**dataclasses.asdict(cfg), "layer_spec": layer_spec, "temperature": temperature}
        # free_port() closes the port it found before rank 0 binds it, so another process can take it in between
        # (seen once in CI: EADDRINUSE in init_process_group). Such a start is retried on a new port.
        for attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            self.ranks = [
                TrainRankActor.options(num_cpus=cfg.cpus_per_rank, name=None).remote(
                    rank, cfg.world_size, port, str(checkpoint_dir), rank_cfg)
                for rank in range(cfg.world_size)
            ]
            try:
                self.info = ray.get([r.ready.remote() for r in self.ranks])
                break
            except ray.exceptions.RayActorError as exc:
                for r in self.ranks:
                    ray.kill(r)
                if "EADDRINUSE" not in str(exc) or attempt == _PORT_ATTEMPTS - 1:
                    raise
        self.dp_size = self.info[0]["dp_size"]
        # Sequence parallelism splits each sequence over tensor-parallel ranks: pad lengths to a multiple.
        self.seq_multiple = cfg.tensor_parallel if cfg.sequence_parallel and cfg.tensor_parallel > 1 else 1

    def _call(self, method: str, items: list[TrainItem], *extra) -> list[Any]:
        """Every rank gets its data-parallel share (tensor-parallel peers get the same share). `items` come longest
        first (longest_first), so each micro-batch is padded to rows of about its own length."""
        shape = plan_shape(items, self.dp_size, self.cfg.micro_batch_size, self.seq_multiple,
                           uniform=self.cfg.pipeline_parallel > 1)
        shards = shard_items(items, self.dp_size)
        return ray.get([getattr(r, method).remote(shards[info["dp_rank"]], shape, *extra)
                        for r, info in zip(self.ranks, self.info)])

    def compute_logprobs(self, items: list[TrainItem]) -> list[list[float]]:
        """Response-token logprobs for each item, in the order given."""
        order = longest_first(items)
        per_rank = self._call("compute_logprobs", [items[i] for i in order])
        out: list[list[float] | None] = [None] * len(items)
        for info, values in zip(self.info, per_rank):
            if values is None or info["tp_rank"] != 0:  # not the last pipeline stage, or a tensor-parallel twin
                continue
            for j, v in enumerate(values):
                out[order[info["dp_rank"] + j * self.dp_size]] = v
        return out  # type: ignore[return-value]

    def train_step(self, items: list[TrainItem], train_version: int = 0) -> dict[str, float]:
        """Trains on a rollout batch in `trainer.num_minibatches` optimizer steps (consecutive slices of the batch).
        With several steps the proximal logprobs (the policy before the first step) are computed first,
        so later steps' PPO ratios measure how far the policy moved and the clip can act. `train_version` is the
        policy version being trained (tokens it generated count as current in the metrics). With
        trainer.compact_batch each slice runs only its distinct samples of non-zero advantage (compact_items); the
        loss is still normalised by the whole slice's tokens, so the gradient is the same."""
        num_mini = min(self.cfg.num_minibatches, len(items))
        bounds = [round(i * len(items) / num_mini) for i in range(num_mini + 1)]
        chunks = [items[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
        chunk_tokens = [sum(_loss_tokens(it) for it in chunk) for chunk in chunks]
        if self.cfg.compact_batch and not self.cfg.moe_router_bias_update_rate:
            chunks = [compact_items(chunk, keep_at_least=self.dp_size) for chunk in chunks]
        if num_mini > 1:
            prox = iter(self.compute_logprobs([it for chunk in chunks for it in chunk]))
            chunks = [[dataclasses.replace(it, prox_logprobs=next(prox)) for it in chunk] for chunk in chunks]
        steps, compute_s = [], 0.0
        for chunk, global_tokens in zip(chunks, chunk_tokens):
            per_rank = self._call("train_step", [chunk[i] for i in longest_first(chunk)], global_tokens,
                                  train_version)
            compute_s += max(r.pop("compute_s") for r in per_rank)  # the slowest rank bounds the step
            # Loss statistics exist on the last pipeline stage; tensor-parallel twins report the same numbers.
            reporting = [r for r, info in zip(per_rank, self.info) if info["last_stage"] and info["tp_rank"] == 0]
            steps.append(({k: sum(r[k] for r in reporting) for k in reporting[0] if k != "grad_norm"},
                          per_rank[0]["grad_norm"]))
        total = {k: sum(s[k] for s, _ in steps) for k in steps[0][0]}
        # The batch's own token counts; the ranks' sums cover the rows they ran, where a skipped zero-advantage
        # row would have added nothing to the loss or the clipped count, but would to the other statistics.
        loss_tokens = sum(_loss_tokens(it) for it in items)
        response_tokens = sum(_model_tokens(it) for it in items)
        stale_tokens = sum(_model_tokens(it, stale_of=train_version) for it in items)
        tokens, response = max(total["tokens"], 1.0), max(total["response_tokens"], 1.0)
        current, stale = total["current_tokens"], total["response_tokens"] - total["current_tokens"]
        metrics = {
            "train/pg_loss": total["pg_loss"] / max(loss_tokens, 1.0),
            "train/pg_clipfrac": total["clipped"] / max(loss_tokens, 1.0),
            "train/ppo_kl": total["approx_kl"] / tokens,
            "train/train_rollout_logprob_abs_diff": total["logprob_abs_diff"] / response,
            "train/train_rollout_logprob_abs_diff_current": total["current_logprob_abs_diff"] / max(current, 1.0),
            "train/train_rollout_logprob_abs_diff_stale":
                (total["logprob_abs_diff"] - total["current_logprob_abs_diff"]) / max(stale, 1.0),
            "train/grad_norm": steps[-1][1],
            "train/grad_norm_mean": sum(g for _, g in steps) / len(steps),
            "train/response_tokens": response_tokens,
            "train/loss_tokens": loss_tokens,
            "train/masked_tokens": response_tokens - loss_tokens,
            "train/stale_token_frac": stale_tokens / max(response_tokens, 1.0),
            "train/optimizer_steps": float(len(steps)),
            "train/rows_trained_frac": sum(map(len, chunks)) / max(len(items), 1),
            "perf/train_compute_time": compute_s,
        }
        if self.cfg.tis_clip or self.cfg.decoupled_ppo:
            metrics.update({"train/tis_weight_mean": total["tis_weight"] / tokens,
                            "train/tis_truncated_frac": total["tis_truncated"] / tokens})
        return metrics

    def sft_step(self, items: list[TrainItem]) -> dict[str, float]:
        """One supervised optimizer step on `items` (loss on their loss-masked response tokens): the mean
        negative log-likelihood per token and the gradient norm."""
        per_rank = self._call("sft_step", [items[i] for i in longest_first(items)],
                              sum(_loss_tokens(it) for it in items))
        reporting = [r for r, info in zip(per_rank, self.info) if info["last_stage"] and info["tp_rank"] == 0]
        nll, tokens = sum(r["nll"] for r in reporting), sum(r["tokens"] for r in reporting)
        return {"nll": nll / max(tokens, 1.0), "tokens": tokens, "grad_norm": per_rank[0]["grad_norm"]}

    def export_weights(self, grads: bool = False) -> ray.ObjectRef:
        """A reference to rank 0's HF-named full weights (all ranks join the gather); engines resolve it
        directly from the object store, so the tensors never pass through the driver. With `grads`: the last
        step's reduced gradients instead (for checks and debugging)."""
        refs = [r.export_hf_weights.remote(grads) for r in self.ranks]
        ray.wait(refs, num_returns=len(refs))
        return refs[0]

    def save_state(self, path: str) -> None:
        """Every rank's training state under `path` (rank_NNN.pt), for resuming with the same layout."""
        ray.get([r.save_state.remote(path) for r in self.ranks])

    def load_state(self, path: str) -> None:
        ray.get([r.load_state.remote(path) for r in self.ranks])

    def save_hf_checkpoint(self, path: str) -> str:
        return ray.get([r.save_hf_checkpoint.remote(path) for r in self.ranks])[0]

    def shutdown(self) -> None:
        ray.get([r.shutdown.remote() for r in self.ranks])
        for r in self.ranks:
            ray.kill(r)


def _loss_tokens(item: TrainItem) -> float:
    """Tokens of the item that count in the loss (the model's, not masked out), as make_micro_batches masks them,
    times the copies the item stands for."""
    n = len(item.tokens) - item.prompt_len
    model = item.model_mask or [1] * n
    loss = item.loss_mask or [1.0] * n
    return item.weight * float(sum(m * w for m, w in zip(model, loss)))


def _model_tokens(item: TrainItem, stale_of: int | None = None) -> float:
    """The item's model tokens (times its copies); with `stale_of`, only those of versions other than that one."""
    n = len(item.tokens) - item.prompt_len
    model = item.model_mask or [1] * n
    if stale_of is not None:
        versions = item.rollout_versions or [stale_of] * n
        model = [m * (v != stale_of) for m, v in zip(model, versions)]
    return item.weight * float(sum(model))
