"""Training throughput of the Megatron GLM-5 model vs a plain-torch forward+backward of the same model
(transformers' GlmMoeDsaForCausalLM, the reference implementation) on the same weights and batch, in one run.

    python bench/train_throughput.py [--preset tiny] [--batch 8] [--seq 128] [--steps 10]
    python bench/train_throughput.py --device cuda --dtype bfloat16 --preset small --specs local,te   # GPU

Each takes full training steps (forward, backward, Adam step); tokens/s and the ratios to plain torch are printed.
On a GPU each Megatron layer spec (local modules, TransformerEngine) is timed against the same reference.
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
    step()  # warm-up (lazy init, allocator, kernel selection)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - t0) / steps


def _profile(name: str, step, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        _sync()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"--- {name}: top operators by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--specs", default="local", help="comma-separated Megatron layer specs: local, te")
    parser.add_argument("--profile", action="store_true", help="print each step's top operators by device time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if (args.device == "cuda") != torch.cuda.is_available():
        # Megatron allocates on the GPU whenever there is one (and the CPU shims only install without one).
        parser.error(f"--device {args.device} but torch.cuda.is_available() is {torch.cuda.is_available()}")
    dtype = getattr(torch, args.dtype)

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
    tokens = torch.randint(0, hf_config["vocab_size"], (args.batch, args.seq), device=args.device)

    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(args.device).train()
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

    hf_state = load_hf_state_dict(ckpt)
    position_ids, mask = causal_inputs(tokens)

    def megatron_step_fn(spec: str):
        model = build_gpt_model(hf_config, params_dtype=dtype, layer_spec=spec)
        load_hf_into_megatron(model, hf_state, ExpertShard.for_rank(hf_config))
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        bf16 = dtype == torch.bfloat16
        with cpu_device_scope():
            opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=bf16, fp16=False,
                                                         params_dtype=dtype), [ddp])

        def megatron_step():
            ddp.zero_grad_buffer()
            opt.zero_grad()
            logits = ddp(tokens, position_ids, mask)
            loss = vocab_parallel_cross_entropy(logits[:, :-1].float().contiguous(), tokens[:, 1:]).mean()
            loss.backward()
            finalize_model_grads([ddp])
            with cpu_device_scope():
                opt.step()
        return megatron_step

    specs = args.specs.split(",")
    steps = {"torch": torch_step, **{spec: megatron_step_fn(spec) for spec in specs}}
    # Interleave the measurements so machine noise hits all alike.
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(2):
        for name, step in steps.items():
            times[name].append(_time_steps(step, args.steps))
    if args.profile:
        for name, step in steps.items():
            _profile(name, step)
    destroy_parallel()
    n = args.batch * args.seq
    best = {name: min(t) for name, t in times.items()}
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"preset {args.preset}, batch {args.batch} x {args.seq} tokens, {args.steps} steps x 2 rounds, "
          f"{args.dtype}, {where}")
    print(f"plain torch (transformers)       : {best['torch'] * 1e3:8.1f} ms/step  {n / best['torch']:9.0f} tokens/s")
    for spec in specs:
        print(f"megatron-core, {spec:5s} layer spec : {best[spec] * 1e3:8.1f} ms/step  {n / best[spec]:9.0f} "
              f"tokens/s  ratio to torch {best['torch'] / best[spec]:.2f}")


if __name__ == "__main__":
    main()
