"""Training throughput of the Megatron GLM-5 model vs a plain-torch forward+backward of the same tiny model
(transformers' GlmMoeDsaForCausalLM, the reference implementation) on the same weights and batch, in one run.

    python bench/train_throughput.py [--preset tiny] [--batch 8] [--seq 128] [--steps 10]

Both take full training steps (forward, backward, Adam step) in fp32 on CPU; tokens/s and the ratio are printed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _time_steps(step, steps: int) -> float:
    step()  # warm-up (lazy init, allocator)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import json

    from transformers import AutoModelForCausalLM

    from glm5_model.compat import cpu_device_scope
    from glm5_model.convert import ExpertShard, load_hf_into_megatron
    from glm5_model.hf_checkpoint import load_hf_state_dict, make_random_checkpoint
    from glm5_model.megatron_config import ParallelLayout
    from glm5_model.model import build_gpt_model
    from glm5_model.parallel import causal_inputs, destroy_parallel, free_port, init_parallel

    ckpt = make_random_checkpoint(args.preset, Path(tempfile.mkdtemp()) / args.preset, seed=0)
    hf_config = json.loads((ckpt / "config.json").read_text())
    tokens = torch.randint(0, hf_config["vocab_size"], (args.batch, args.seq))

    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-5)

    def torch_step():
        ref_opt.zero_grad(set_to_none=True)
        logits = reference(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        ref_opt.step()

    init_parallel(0, 1, ParallelLayout(), master_port=free_port())
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    model = build_gpt_model(hf_config)
    load_hf_into_megatron(model, load_hf_state_dict(ckpt), ExpertShard.for_rank(hf_config))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    with cpu_device_scope():
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=False, fp16=False,
                                                     params_dtype=torch.float32), [ddp])
    position_ids, mask = causal_inputs(tokens)

    def megatron_step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        logits = ddp(tokens, position_ids, mask)
        loss = vocab_parallel_cross_entropy(logits[:, :-1].float().contiguous(), tokens[:, 1:]).mean()
        loss.backward()
        finalize_model_grads([ddp])
        with cpu_device_scope():
            opt.step()

    # Interleave the two measurements so machine noise hits both alike.
    t_torch, t_meg = [], []
    for _ in range(2):
        t_torch.append(_time_steps(torch_step, args.steps))
        t_meg.append(_time_steps(megatron_step, args.steps))
    destroy_parallel()
    n = args.batch * args.seq
    best_torch, best_meg = min(t_torch), min(t_meg)
    print(f"preset {args.preset}, batch {args.batch} x {args.seq} tokens, {args.steps} steps x 2 rounds, "
          f"{args.threads} threads, fp32, CPU")
    print(f"plain torch (transformers) : {best_torch * 1e3:8.1f} ms/step  {n / best_torch:9.0f} tokens/s")
    print(f"megatron-core (slipstream) : {best_meg * 1e3:8.1f} ms/step  {n / best_meg:9.0f} tokens/s")
    print(f"ratio megatron / torch tokens/s: {best_torch / best_meg:.2f}")


if __name__ == "__main__":
    main()
