"""A group of Megatron training ranks (Ray actors) behind one object with one call per RL stage."""
from __future__ import annotations

import dataclasses
from typing import Any

import ray

from glm5_model.parallel import free_port
from trainer.actor import TrainRank
from trainer.batching import TrainItem, plan_shape, shard_items
from trainer.config import TrainerConfig

TrainRankActor = ray.remote(TrainRank)
_PORT_ATTEMPTS = 3


class TrainerGroup:
    def __init__(self, cfg: TrainerConfig, checkpoint_dir: str, layer_spec: str = "auto"):
        self.cfg = cfg
        rank_cfg = {**dataclasses.asdict(cfg), "layer_spec": layer_spec}
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
        """Every rank gets its data-parallel share (tensor-parallel peers get the same share)."""
        shape = plan_shape(items, self.dp_size, self.cfg.micro_batch_size, self.seq_multiple)
        shards = shard_items(items, self.dp_size)
        return ray.get([getattr(r, method).remote(shards[info["dp_rank"]], shape, *extra)
                        for r, info in zip(self.ranks, self.info)])

    def compute_logprobs(self, items: list[TrainItem]) -> list[list[float]]:
        """Response-token logprobs for each item, in the order given."""
        per_rank = self._call("compute_logprobs", items)
        out: list[list[float] | None] = [None] * len(items)
        for info, values in zip(self.info, per_rank):
            if values is None or info["tp_rank"] != 0:  # not the last pipeline stage, or a tensor-parallel twin
                continue
            for j, v in enumerate(values):
                out[info["dp_rank"] + j * self.dp_size] = v
        return out  # type: ignore[return-value]

    def train_step(self, items: list[TrainItem]) -> dict[str, float]:
        global_tokens = sum(len(it.tokens) - it.prompt_len for it in items)
        per_rank = self._call("train_step", items, global_tokens)
        # Loss statistics exist on the last pipeline stage; tensor-parallel twins report the same numbers.
        reporting = [r for r, info in zip(per_rank, self.info) if info["last_stage"] and info["tp_rank"] == 0]
        total = {k: sum(r[k] for r in reporting) for k in ("pg_loss", "clipped", "approx_kl", "tokens",
                                                           "logprob_abs_diff", "tis_weight", "tis_truncated")}
        tokens = max(total["tokens"], 1.0)
        tis = {"train/tis_weight_mean": total["tis_weight"] / tokens,
               "train/tis_truncated_frac": total["tis_truncated"] / tokens} if self.cfg.tis_clip else {}
        return {**tis,
            "train/pg_loss": total["pg_loss"] / tokens,
            "train/pg_clipfrac": total["clipped"] / tokens,
            "train/ppo_kl": total["approx_kl"] / tokens,
            "train/train_rollout_logprob_abs_diff": total["logprob_abs_diff"] / tokens,
            "train/grad_norm": per_rank[0]["grad_norm"],
            "train/response_tokens": total["tokens"],
        }

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
