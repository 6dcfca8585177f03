"""Megatron-core without CUDA, TransformerEngine or the Hadamard kernel: the small set of shims it needs, each
group installed only where its piece is missing (a GPU without TransformerEngine needs the last two groups too).

megatron-core (pinned 0.16.1) assumes CUDA in a few places that have nothing to do with the math: RNG state
tracking, `torch.cuda.current_device()` as an allocation device, an optional TransformerEngine GEMM, and an
attention core that cannot take MLA's differing key/value head sizes. Each shim below names the crash it
prevents. tests/test_canary.py checks every internal name listed in `MEGATRON_INTERNALS` so a megatron upgrade
fails loudly instead of silently skipping a shim. We never edit megatron itself.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

# (module, attribute) pairs of megatron internals the shims replace or read.
MEGATRON_INTERNALS = [
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.transformer.moe.moe_utils", "te_general_gemm"),
    ("megatron.core.transformer.dot_product_attention", "DotProductAttention"),
    ("megatron.core.transformer.multi_latent_attention", "HAVE_TE"),
    ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_decoder_block_spec"),
    ("megatron.core.transformer.torch_norm", "WrappedTorchNorm"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.transformer.experimental_attention_variant.dsa", "rotate_activation"),
    ("megatron.core.post_training.modelopt.layers", "Linear"),
    ("megatron.core.transformer.experimental_attention_variant.dsa", "DSAIndexer"),
    ("megatron.core.transformer.experimental_attention_variant.dsa", "DSAttention"),
]

_installed = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def param_device(config) -> torch.device | None:
    """Where a module outside Megatron's own layers allocates its parameters: Megatron's choice (the current GPU
    unless use_cpu_initialization); None keeps the ambient default, so a build under torch.device("meta") is free."""
    if getattr(config, "use_cpu_initialization", True):
        return None
    return torch.device("cuda", torch.cuda.current_device())


def install_compat() -> None:
    """Idempotent. Must run before megatron modules that hold references to the patched names are imported."""
    global _installed
    if _installed:
        return
    if not cuda_available():
        _install_cpu_shims()  # first: it keeps megatron's imports away from sglang's CUDA-only flash_mla
    if importlib.util.find_spec("transformer_engine") is None:
        _install_no_te_shims()
    _install_hadamard_fallback()
    _installed = True


def _install_no_te_shims() -> None:
    """Without TransformerEngine (on CPU, or a GPU without it) megatron still takes two TE-only branches."""
    # Referenced unconditionally by MoE utils although it is only set when TransformerEngine is present.
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    moe_utils.te_general_gemm = None
    # MLA tests isinstance(linear_proj, TELinear) whenever HAVE_TE, which its import sets without TE present.
    mla = importlib.import_module("megatron.core.transformer.multi_latent_attention")
    mla.HAVE_TE = False


def mark_absent(*names: str) -> None:
    """Makes `import name` raise ImportError (and importlib.util.find_spec answer None) in this process, for
    CUDA-only packages that are installed but cannot serve on CPU. A package already imported is left alone."""
    for name in names:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def disable_torch_compile() -> None:
    """torch.compile'd functions run eagerly in this process (torch._dynamo reads the flag at call time). Not
    through TORCH_COMPILE_DISABLE: the environment would carry it into every process this one starts (a test
    process's `python -m trainer.main` runs, and through Ray their engines)."""
    import torch._dynamo  # Megatron's import (torch.compile decorators) imports it anyway

    torch._dynamo.config.disable = True


def _install_cpu_shims() -> None:
    # sglang installs sgl-flash-mla, whose import raises OSError without a GPU; megatron only catches ImportError.
    # A None entry in sys.modules turns the import into the ImportError megatron expects. FlashInfer (CUDA-only,
    # also sglang's) imports fine but costs 2.3 s of the rank's start: megatron's inference context imports it
    # behind try/except ImportError, for its fused rope, which training never uses.
    mark_absent("flash_mla", "flashinfer")
    # Megatron wraps its fused elementwise kernels (jit_fuser) in torch.compile. On CPU inductor's C++ code
    # generation cost each rank's first two training steps ~2.6 s (1.77 + 0.86 s against 0.15 + 0.10 s eager;
    # later steps 0.10 s either way, tiny preset) and needs a C++ compiler on the machine: run them eagerly.
    disable_torch_compile()

    # Megatron allocates on `torch.cuda.current_device()` and seeds/tracks a "cuda" RNG; the CPU generator serves.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]  # the CPU seed is set by the caller
    # Pipeline point-to-point code synchronises the CUDA stream after each exchange; CPU ops are synchronous.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random_mod._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _install_hadamard_fallback() -> None:
    """DSA's indexer rotates q and k by a Hadamard transform through a CUDA-only, bf16-only kernel. The rotation
    is orthogonal and applied to both, so the index scores q.k are unchanged without it (exactly, in exact
    arithmetic): use the identity when the kernel is absent."""
    dsa = importlib.import_module("megatron.core.transformer.experimental_attention_variant.dsa")
    if getattr(dsa, "hadamard_transform", None) is None:
        dsa.rotate_activation = lambda x: x


def mla_core_attention_class():
    """Megatron's local DotProductAttention sizes its output by the query head dim; MLA's value head dim differs
    (GLM-5: qk 192+64, v 256; tiny: qk 32+16, v 32). This subclass accepts MLA's k/v channel
    arguments and sizes the output by v_head_dim."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's grad clipping asserts grads are 'torch.cuda.FloatTensor'; the CPU twin is the same thing.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        device = kwargs.get("device")
        if device is not None and "cuda" in str(device):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def cpu_device_scope():
    """Megatron's optimizer construction and step allocate small tensors with device='cuda' and assert CUDA tensor
    types; on CPU, rewrite those allocations to the CPU and answer type() as the CUDA twin, for the duration of the
    call. A no-op scope when CUDA is present."""
    import contextlib

    return contextlib.nullcontext() if cuda_available() else _CudaToCpuMode()
