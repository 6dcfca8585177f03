"""Out-of-tree SGLang platform that serves models on a CPU-only machine (pinned sglang==0.5.23).

Why an out-of-tree (OOT) platform rather than SGLang's own CPU platform: the in-tree one
(`SGLANG_USE_CPU_ENGINE=1`) needs the CPU build of sgl-kernel, which PyPI does not ship, and its `is_cpu()`
branches import those kernels. Declaring ourselves OOT keeps every `is_cpu()` path off, so SGLang falls back to
its pure-torch code (torch_native attention, native MoE, pytorch sampling), which is what we want on CPU.

SGLang discovers this module through the entry point `sglang.srt.platforms: slipstream_cpu` (pyproject.toml) and
calls `activate()`; on a machine with CUDA it returns None so SGLang's CUDA platform is used unchanged.
"""
from __future__ import annotations

import logging

import torch
from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

logger = logging.getLogger(__name__)

PLATFORM_NAME = "slipstream_cpu"  # the entry-point name; SGLANG_PLATFORM selects it when several are installed
# Without a cap SGLang sizes the KV cache from free RAM (~70% of it). Tests and CPU rollouts need far less.
DEFAULT_MAX_TOTAL_TOKENS = 32768


def activate() -> str | None:
    """Entry point for `sglang.srt.platforms`: the platform class's qualname, or None when CUDA is present."""
    if torch.cuda.is_available():
        return None
    return f"{__name__}.SlipstreamCpuPlatform"


class SlipstreamCpuPlatform(CpuDeviceMixin, SRTPlatform):
    """CPU device operations from SGLang's CpuDeviceMixin, but identified as out-of-tree (see module doc)."""

    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    # Nothing enabled: no triton (torch-native allocator / req-to-token writers), no graph capture, no pynccl.
    capabilities = PlatformCapabilities()

    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return "torch_native"

    def get_dispatch_key_name(self) -> str:
        # BaseFusedOp then picks forward_native(): pure torch. "cpu" would select sgl-kernel CPU ops.
        return "native"

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    def empty_cache(self) -> None:
        # A no-op on purpose. CpuDeviceMixin's version runs a full gc.collect(), and SGLang calls empty_cache() from
        # the scheduler's flush_cache (before every weight update), on idle sleep and on weight reload. In an engine
        # process the collection took ~480 ms of a ~600 ms weight push of the tiny model (measured), while on CPU
        # there is no allocator cache to return: refcounting already frees tensors, and the cyclic collector still
        # runs on its own schedule.
        return None

    def get_device(self, device_id: int | None = 0) -> str:
        # A string, not CpuDeviceMixin's torch.device: when no device is passed, server-arg resolution
        # (`utils.common.get_device`) takes this value and calls `.split(":")` on it. torch accepts "cpu" wherever
        # it accepts a device.
        return "cpu"

    # In-tree KV pools and paged allocator: they allocate on `device` and work for any torch device.
    def get_kv_pool_cls(self, *, kind):
        return None

    def get_paged_allocator_cls(self):
        return None

    def get_graph_runner_cls(self):
        return None

    def init_backend(self) -> None:
        # Called in each worker when model_runner is imported, before the model is built. load_plugins() already
        # applies the patches in the scheduler process; applying here too (idempotent) covers any worker process
        # that SGLang starts without calling load_plugins().
        from rollout.sglang_cpu.patches import apply_patches

        apply_patches()

    def apply_server_args_defaults(self, server_args) -> None:
        """CPU defaults. `server_args` is SGLang's recording view: assignments become declared defaults.

        Runs after SGLang's own CPU hook (which, on x86, would pick the `intel_amx` attention backend needing the
        CPU sgl-kernel) and after the CUDA-graph config was resolved, so graph phases are switched off here
        explicitly as well.
        """
        from rollout.sglang_cpu.patches import apply_patches

        # Server-argument resolution (model_hook) already consults is_deepseek_dsa in the launching process.
        apply_patches()
        if server_args.device in (None, "auto"):
            server_args.device = "cpu"
        if server_args.attention_backend in (None, "intel_amx"):
            server_args.attention_backend = "torch_native"
        for field in ("prefill_attention_backend", "decode_attention_backend"):
            if getattr(server_args, field, None) == "intel_amx":
                setattr(server_args, field, "torch_native")
        if server_args.sampling_backend is None:
            server_args.sampling_backend = "pytorch"
        if server_args.max_total_tokens is None:
            server_args.max_total_tokens = DEFAULT_MAX_TOTAL_TOKENS
        server_args.disable_cuda_graph = True
        # An idle scheduler otherwise busy-polls its sockets at 100% of a core (measured), which on a small CPU
        # box starves the trainer and any other engine. With this it blocks on the sockets when it has no work.
        server_args.sleep_on_idle = True
        try:
            from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

            config = server_args.cuda_graph_config
            if config is not None and not isinstance(config, dict):
                for phase in Phase.ALL:
                    config = with_phase(config, phase, backend=Backend.DISABLED)
                server_args.cuda_graph_config = config
        except (ImportError, AttributeError, KeyError, TypeError) as exc:  # capabilities already forbid capture
            logger.debug("could not rewrite cuda_graph_config for CPU: %s", exc)
