"""torch.distributed + Megatron parallel-state setup (gloo on CPU, NCCL on GPU) and model-input helpers."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from glm5_model.compat import cuda_available, install_compat
from glm5_model.megatron_config import ParallelLayout


def init_parallel(rank: int, world_size: int, layout: ParallelLayout, master_addr: str = "127.0.0.1",
                  master_port: int = 29500, seed: int = 1234) -> None:
    install_compat()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", master_addr)
        os.environ.setdefault("MASTER_PORT", str(master_port))
        backend = "nccl" if cuda_available() else "gloo"
        if cuda_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                init_method=f"tcp://{master_addr}:{master_port}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            pipeline_model_parallel_size=layout.pipeline_parallel,
            expert_model_parallel_size=layout.expert_parallel,
            expert_tensor_parallel_size=layout.expert_tp,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def causal_inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """position ids and the explicit causal mask (True = masked) the local attention path needs."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), diagonal=1)
    return position_ids, mask.view(1, 1, s, s)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
