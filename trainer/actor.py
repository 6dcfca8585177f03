"""One Megatron-core training rank. `TrainRankActor` runs it as a Ray actor; `trainer/group.py` drives a group.

Each rank holds the GLM-5 GPTModel wrapped in Megatron's DistributedDataParallel and Megatron's optimizer, takes
its data-parallel share of the batch, and joins the collectives (gradient all-reduce, MoE token all-gather,
weight gather for export)."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from glm5_model.compat import cpu_device_scope, cuda_available
from glm5_model.convert import (ExpertShard, TPShard, load_hf_into_megatron, megatron_tensors, megatron_to_hf,
                                tp_merge)
from glm5_model.hf_checkpoint import load_hf_state_dict
from glm5_model.megatron_config import ParallelLayout
from glm5_model.model import build_gpt_model
from glm5_model.parallel import causal_inputs, init_parallel
from trainer.batching import BatchShape, TrainItem, make_micro_batches
from trainer.losses import ppo_clip_loss, truncated_is_weights


class TrainRank:
    def __init__(self, rank: int, world_size: int, master_port: int, checkpoint_dir: str, cfg: dict[str, Any]):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self._compute_s = 0.0  # time in forward/backward/optimizer since train_step last reported it
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        tp = cfg["tensor_parallel"]
        self.layout = ParallelLayout(tensor_parallel=tp, expert_parallel=cfg["expert_parallel"],
                                     pipeline_parallel=cfg["pipeline_parallel"],
                                     first_stage_layers=cfg.get("pipeline_first_stage_layers"),
                                     last_stage_layers=cfg.get("pipeline_last_stage_layers"),
                                     sequence_parallel=cfg["sequence_parallel"] and tp > 1)
        init_parallel(rank, world_size, self.layout, master_port=master_port, seed=cfg["seed"])
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        # init_parallel picked this rank's GPU when there is one.
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")
        self.checkpoint_dir = checkpoint_dir
        self.hf_config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
        self.shard = ExpertShard.for_rank(self.hf_config, ps.get_expert_model_parallel_rank(),
                                          self.layout.expert_parallel)
        self.tp = TPShard(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                          ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
        self.first_stage, self.last_stage = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        model = build_gpt_model(self.hf_config, self.layout, pre_process=self.first_stage,
                                post_process=self.last_stage, bias_update_rate=cfg["moe_router_bias_update_rate"],
                                layer_spec=cfg.get("layer_spec", "auto"))
        # Names are global (model.layers.<global index>) for conversion; a pipeline stage numbers its layers locally.
        self.layer_offset = model.decoder.layers[0].layer_number - 1
        hf_state = load_hf_state_dict(checkpoint_dir)
        self.tp_split_names = load_hf_into_megatron(model, hf_state, self.shard, self.tp, self.layer_offset)
        del hf_state
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False)
        self.model = DistributedDataParallel(model.config, ddp_config, model)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=cfg["lr"], min_lr=cfg["lr"], weight_decay=cfg["weight_decay"],
            adam_beta1=cfg["adam_beta1"], adam_beta2=cfg["adam_beta2"], clip_grad=cfg["grad_clip"],
            bf16=False, fp16=False, params_dtype=torch.float32, use_distributed_optimizer=False,
        )
        with cpu_device_scope():
            self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()

    def ready(self) -> dict[str, Any]:
        """Where this rank sits: the group sends the same data to ranks with the same dp_rank."""
        return {"rank": self.rank, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "tp_rank": self.tp.rank,
                "last_stage": self.last_stage, "pp_rank": self.pp_rank,
                "expert_shard": (self.shard.ep_rank, self.shard.num_local),
                "params": sum(p.numel() for p in self.model.parameters())}

    def _token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[:, t+1] | tokens[:, :t+1]) for every t: [b, s-1], from [b, s, vocab / tp] logits, at the
        engines' sampling temperature: the engine reports (and samples from) softmax(logits / T), so the importance
        ratios against its logprobs need the same distribution."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = logits[:, :-1].float()
        temperature = self.cfg.get("temperature", 1.0)
        if temperature != 1.0:
            logits = logits / temperature
        return -vocab_parallel_cross_entropy(logits.contiguous(), tokens[:, 1:])

    def _batches(self, items: list[TrainItem], shape: BatchShape, current_version: int = 0):
        batches = make_micro_batches(items, shape, current_version=current_version)
        for m, mb in enumerate(batches):
            yield mb.to(self.device), items[m * shape.rows:(m + 1) * shape.rows]

    def _run_schedule(self, items: list[TrainItem], shape: BatchShape, loss_fn, forward_only: bool,
                      current_version: int = 0) -> list:
        """Megatron's schedule (1F1B across pipeline stages, a plain loop without PP) over the micro-batches;
        `loss_fn(micro_batch, items, logits)` runs on the last stage and returns (loss, per-micro-batch result)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = list(self._batches(items, shape, current_version))

        def forward_step(data_iterator, model):
            mb, chunk = next(data_iterator)
            position_ids, mask = causal_inputs(mb.tokens)
            return model(mb.tokens, position_ids, mask), functools.partial(loss_fn, mb, chunk)

        with cpu_device_scope():  # the schedules allocate token counters with device="cuda"
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[self.model],
                num_microbatches=len(batches), seq_length=shape.seq_len, micro_batch_size=shape.rows,
                forward_only=forward_only)

    @torch.no_grad()
    def compute_logprobs(self, items: list[TrainItem], shape: BatchShape) -> list[list[float]] | None:
        """Response-token logprobs under the current weights, one list per real item (in order); None on ranks
        that are not the last pipeline stage."""
        self.model.eval()

        def loss_fn(mb, chunk, logits):
            logprobs = self._token_logprobs(logits, mb.tokens)
            rows = [logprobs[i, it.prompt_len - 1:len(it.tokens) - 1].tolist() for i, it in enumerate(chunk)]
            return logprobs.sum() * 0.0, rows

        t0 = time.perf_counter()
        per_micro = self._run_schedule(items, shape, loss_fn, forward_only=True)
        self._compute_s += time.perf_counter() - t0
        return [row for rows in per_micro for row in rows] if self.last_stage else None

    def train_step(self, items: list[TrainItem], shape: BatchShape, global_tokens: int,
                   train_version: int = 0) -> dict[str, float]:
        """One optimizer step on this rank's share. Losses are normalised by the loss-token count of the whole
        global batch and scaled by the data-parallel size, because Megatron's DDP averages gradients over
        data-parallel ranks: the result is the token-level mean over the global batch. (Megatron's schedule
        divides each micro-batch loss by the micro-batch count; the scale undoes that too.)

        The PPO ratio is pi / pi_prox, pi_prox being the trainer's policy before this batch's first optimizer step:
        given per token (items' prox_logprobs) when the batch is split into several steps, else the current policy
        at the gradient (ratio 1). The behaviour correction pi_prox / pi_behav (the engine's logprob) weights each
        token: decoupled PPO (AReaL) when trainer.decoupled_ppo, truncated at trainer.tis_clip when set (TIS).
        Metrics split tokens by version: those the current policy generated (`train_version`) and stale ones."""
        from megatron.core.distributed import finalize_model_grads

        t0 = time.perf_counter()
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        scale = self.dp_size * shape.num_micro / max(global_tokens, 1)
        tis_clip, decoupled = self.cfg.get("tis_clip", 0.0), self.cfg.get("decoupled_ppo", False)
        cap = tis_clip if tis_clip else float("inf")

        def loss_fn(mb, chunk, logits):
            logprobs = self._token_logprobs(logits, mb.tokens)
            prox = mb.prox_logprobs if mb.prox_logprobs is not None else logprobs.detach()
            weights = truncated_is_weights(prox, mb.rollout_logprobs, cap) if (tis_clip or decoupled) else None
            terms = ppo_clip_loss(logprobs, prox, mb.advantages, mb.loss_mask,
                                  self.cfg["clip_eps_low"], self.cfg["clip_eps_high"], weights)
            diff = (prox - mb.rollout_logprobs).abs() * mb.response_mask
            current = (mb.versions == train_version).to(diff.dtype) * mb.response_mask
            stats = {"pg_loss": terms.loss_sum.item(), "clipped": terms.clipped_tokens.item(),
                     "approx_kl": terms.approx_kl_sum.item(), "tokens": mb.loss_mask.sum().item(),
                     "response_tokens": mb.response_mask.sum().item(),
                     "logprob_abs_diff": diff.sum().item(), "current_tokens": current.sum().item(),
                     "current_logprob_abs_diff": (diff * current).sum().item(),
                     "tis_weight": 0.0, "tis_truncated": 0.0}
            if weights is not None:
                stats["tis_weight"] = (weights * mb.loss_mask).sum().item()
                stats["tis_truncated"] = ((weights >= cap).to(weights.dtype) * mb.loss_mask).sum().item()
            return terms.loss_sum * scale, stats

        per_micro = self._run_schedule(items, shape, loss_fn, forward_only=False, current_version=train_version)
        finalize_model_grads([self.model])
        with cpu_device_scope():
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError(f"rank {self.rank}: optimizer step failed (non-finite gradients?)")
        sums = {k: sum(m[k] for m in per_micro) for k in per_micro[0]} if self.last_stage else {}
        sums["grad_norm"] = float(grad_norm)
        # The rank's own compute (this step and logprob passes since the last one): the driver's step-time split
        # tells it apart from the Ray calls and serialization around it.
        sums["compute_s"], self._compute_s = self._compute_s + time.perf_counter() - t0, 0.0
        return sums

    def sft_step(self, items: list[TrainItem], shape: BatchShape, global_tokens: int) -> dict[str, float]:
        """One supervised optimizer step (the warm-up, trainer/warmup.py): the mean negative log-likelihood of the
        items' loss-masked response tokens over the global batch, normalised as in train_step."""
        from megatron.core.distributed import finalize_model_grads

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        scale = self.dp_size * shape.num_micro / max(global_tokens, 1)

        def loss_fn(mb, chunk, logits):
            nll_sum = -(self._token_logprobs(logits, mb.tokens) * mb.loss_mask).sum()
            return nll_sum * scale, {"nll": nll_sum.item(), "tokens": mb.loss_mask.sum().item()}

        per_micro = self._run_schedule(items, shape, loss_fn, forward_only=False)
        finalize_model_grads([self.model])
        with cpu_device_scope():
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError(f"rank {self.rank}: optimizer step failed (non-finite gradients?)")
        sums = {k: sum(m[k] for m in per_micro) for k in per_micro[0]} if self.last_stage else {}
        sums["grad_norm"] = float(grad_norm)
        return sums

    @torch.no_grad()
    def export_hf_weights(self, grads: bool = False) -> list[tuple[str, torch.Tensor]] | None:
        """Full HF-named weights (or, with `grads`, the last step's reduced gradients of the trained ones),
        gathered across tensor-, expert- and pipeline-parallel ranks. A collective: every rank must call it;
        rank 0 returns the tensors, the others None."""
        from megatron.core import parallel_state as ps

        ep = self.layout.expert_parallel
        out: list[tuple[str, torch.Tensor]] = []
        for name, param in megatron_tensors(self.model.module, self.layer_offset):
            tensor = getattr(param, "main_grad", None) if grads else param
            if tensor is None:  # no gradient: frozen (the indexer) or a buffer (the router's selection bias)
                continue
            if name in self.tp_split_names:
                tensor = self._gather_tp(name, tensor, param)
            if ".local_experts." in name and ep > 1:
                parts = [torch.empty_like(tensor) for _ in range(ep)]
                dist.all_gather(parts, tensor.contiguous(), group=ps.get_expert_model_parallel_group())
                for ep_rank, part in enumerate(parts):
                    out.extend(megatron_to_hf(name, part, dataclasses.replace(self.shard, ep_rank=ep_rank)))
            else:
                out.extend(megatron_to_hf(name, tensor, self.shard))
        if self.layout.pipeline_parallel > 1:
            out = self._gather_pipeline_stages(out)
        if self.rank != 0:
            return None
        return [(n, t.detach().to("cpu", copy=True)) for n, t in out]

    def _gather_pipeline_stages(self, out: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Every stage's tensors on the first stage (a collective over the pipeline group)."""
        from megatron.core import parallel_state as ps

        group = ps.get_pipeline_model_parallel_group()
        first = dist.get_process_group_ranks(group)[0]
        stages = [None] * dist.get_world_size(group) if self.rank == first else None
        dist.gather_object(out, stages, dst=first, group=group)
        return [pair for stage in stages for pair in stage] if stages is not None else out

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's own pieces, by Megatron name (what an offline per-rank checkpoint file holds)."""
        return {n: t.detach().clone() for n, t in megatron_tensors(self.model.module)}

    def _gather_tp(self, name: str, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The full tensor from every tensor-parallel rank's piece; `param` carries the partition attributes."""
        from megatron.core import parallel_state as ps

        expert = ".local_experts." in name
        size = self.tp.expert_size if expert else self.tp.size
        group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return tp_merge(parts, param)

    def save_state(self, path: str) -> str:
        """This rank's training state (weights, optimizer moments and step counts, RNG) for resuming with the same
        layout. The HF export (save_hf_checkpoint) is the layout-free format; this one keeps Adam's moments."""
        target = Path(path) / f"rank_{self.rank:03d}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        state = {"layout": dataclasses.asdict(self.layout), "world_size": self.world_size,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if cuda_available() else None}
        tmp = target.with_name(target.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)  # a crash mid-write leaves the previous file, never a torn one
        return str(target)

    def load_state(self, path: str) -> None:
        source = Path(path) / f"rank_{self.rank:03d}.pt"
        if not source.exists():
            raise FileNotFoundError(f"{source}: no training state for rank {self.rank} of {self.world_size} "
                                    "(saved with a different trainer.world_size?)")
        # RNG states must stay CPU ByteTensors; load_state_dict copies weights and moments to their devices.
        state = torch.load(source, map_location="cpu", weights_only=False)
        now = dataclasses.asdict(self.layout)
        if state["layout"] != now or state["world_size"] != self.world_size:
            changed = {k: f"{state['layout'].get(k)} -> {now[k]}" for k in now if state["layout"].get(k) != now[k]}
            raise ValueError(f"{source}: saved with world_size {state['world_size']} and a different parallel "
                             f"layout ({changed or 'same layout'}); resume with the saved trainer.world_size / "
                             "tensor_parallel / pipeline_parallel / expert_parallel, or start from its HF export")
        self.model.load_state_dict(state["model"])
        with cpu_device_scope():
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and cuda_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # ------------------------------------------------------------------ weight sync (trainer/weight_sync)
    def weight_sync_plan(self, bucket_bytes: int, engine_dtype: str, skip: frozenset[str] = frozenset()) -> list:
        """The buckets this rank sends (metadata only), for the driver to put in one global order."""
        return self._weight_sender().plan(bucket_bytes, getattr(torch, engine_dtype), skip)

    def weight_group_address(self) -> tuple[str, int, str]:
        return self._weight_sender().group_address()

    def join_weight_group(self, group_name: str, address: str, port: int, world_size: int, backend: str) -> None:
        self._weight_sender().join_group(group_name, address, port, world_size, backend)

    def leave_weight_group(self, group_name: str) -> None:
        self._weight_sender().leave_group(group_name)

    def push_weights(self, plan: list, version: int, engines: list | None = None, group_name: str | None = None,
                     verify: bool = False, measure: bool = False):
        """Sends this rank's buckets of the global `plan` (trainer/weight_sync/sender.py); a collective over the
        ranks that lend tensor-parallel pieces, so every rank is called with the same plan."""
        return self._weight_sender().push(plan, version, engines=engines, group_name=group_name, verify=verify,
                                          measure=measure)

    def _weight_sender(self):
        if getattr(self, "_sender", None) is None:
            from trainer.weight_sync.sender import WeightSender

            self._sender = WeightSender.for_megatron_rank(self.model.module, self.layer_offset, self.tp_split_names,
                                                          self.shard, (self.tp.size, self.tp.expert_size),
                                                          self.device)
        return self._sender

    def save_hf_checkpoint(self, path: str) -> str | None:
        """Writes an HF-format checkpoint directory (collective; rank 0 writes)."""
        named = self.export_hf_weights()
        if named is None:
            return None
        from glm5_model.hf_checkpoint import write_checkpoint_dir

        return str(write_checkpoint_dir(Path(path), dict(named), self.hf_config, tokenizer_from=self.checkpoint_dir))

    def shutdown(self) -> None:
        from glm5_model.parallel import destroy_parallel

        if getattr(self, "_sender", None) is not None:
            self._sender.close()
        destroy_parallel()
