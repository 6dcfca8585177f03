"""Patches to SGLang internals that serving GLM-5 (MLA + MoE + DSA) on CPU needs (pinned sglang==0.5.23).

Applied by `apply_patches()`, the `sglang.srt.plugins: slipstream_cpu_patches` entry point. SGLang calls its
general plugins through `load_plugins()` in the launching process (`Engine.__init__`, before the server arguments
are built) and at the start of every scheduler process (`run_scheduler_process`), i.e. before the model is built
in either. The platform calls `apply_patches()` again from `init_backend()` (each worker) and
`apply_server_args_defaults()` (launching process) so no process can miss them; applying twice is a no-op.

Nothing is patched when CUDA is present: on a GPU SGLang's own kernels serve GLM-5, DSA included. The same entry
point installs rollout/weight_receiver.py (checksummed bucket receive, weight read-back) on every device.

The patches (the "A/B/C" names are used in logs, errors and the canary test):
  A. rope: `get_rope_cpu` asserts the rope scaling is `deepseek_yarn`; any other scaling (our checkpoints use
     plain rope) goes to the generic `get_rope` instead.
  B. MLA attention method: the DeepSeek attention-method table has no `torch_native` entry and falls back to the
     triton handler, which picks the non-absorbed MHA prefill; the torch-native backend then ignores the k/v it
     is handed and reads the compressed MLA cache. Shapes fit, logits are silently wrong (logprob diff ~1.75).
     We register `torch_native` to always use the absorbed MLA path.
  C. DSA: every DSA path (server-arg resolution, attention backends, the indexer and its FP8 key cache) needs
     CUDA. `is_deepseek_dsa` answers False in every imported copy, so SGLang builds GLM-5 as dense MLA + MoE;
     patch E puts the sparse selection back. (Other DSA models, e.g. DeepSeek-V3.2, stay dense: exact only while
     the context is no longer than `index_topk`, and a warning says so.)
  D. batched attention: the torch-native backend attends one request at a time (a Python loop of cache gathers
     and SDPA calls per layer and step), which made each running request cost ~4x what it costs in transformers'
     `generate` per decode step. Decode and causal prefill (no encoder, no sliding window) now attend for the
     whole batch at once (rollout/sglang_cpu/batched_attention.py); other cases, and a prefill whose padded
     batch would be too large, keep SGLang's loop. Same arithmetic per request: logprobs are unchanged.
  E. GLM-5 sparse attention: each GLM-5 attention layer gets a pure-torch DSA indexer under the checkpoint's
     parameter names, run by hooks around the layer's forward; its top-k selection masks patch D's attention
     (rollout/sglang_cpu/sparse_attention.py). With index_topk below the context, logprobs match Megatron's DSA.
"""
from __future__ import annotations

import importlib
import logging
import sys
import threading

import torch

logger = logging.getLogger(__name__)

# (module, attribute) of every SGLang internal the patches read or replace. tests/test_canary_sglang.py imports
# each one so an SGLang upgrade that moves them fails loudly instead of silently serving wrong logprobs.
PATCHED_NAMES: list[tuple[str, str]] = [
    ("sglang.srt.layers.rotary_embedding.factory", "get_rope_cpu"),  # A (replaced)
    ("sglang.srt.layers.rotary_embedding.factory", "get_rope"),  # A (called instead)
    ("sglang.srt.layers.rotary_embedding.factory", "get_rope_wrapper"),  # A (looks get_rope_cpu up at call time)
    ("sglang.srt.models.deepseek_common.attention_backend_handler", "AttentionBackendRegistry"),  # B
    ("sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods", "AttnForwardMethod"),  # B
    ("sglang.srt.configs.model_config", "is_deepseek_dsa"),  # C (replaced, plus its copies)
    ("sglang.srt.layers.attention.torch_native_backend", "TorchNativeAttnBackend"),  # D (two methods replaced)
    ("sglang.srt.models.deepseek_v2", "DeepseekV2AttentionMLA"),  # E (__init__ wrapped; forward hooked)
    ("sglang.srt.model_executor.forward_context", "get_attn_backend"),  # E (where the KV pools are)
]
# Which patch each name belongs to, for the canary's error message.
PATCH_OF_NAME: dict[tuple[str, str], str] = {
    PATCHED_NAMES[0]: "A (rope)",
    PATCHED_NAMES[1]: "A (rope)",
    PATCHED_NAMES[2]: "A (rope)",
    PATCHED_NAMES[3]: "B (MLA torch_native attention method)",
    PATCHED_NAMES[4]: "B (MLA torch_native attention method)",
    PATCHED_NAMES[5]: "C (DSA served as dense MLA)",
    PATCHED_NAMES[6]: "D (batched attention)",
    PATCHED_NAMES[7]: "E (GLM-5 sparse attention)",
    PATCHED_NAMES[8]: "E (GLM-5 sparse attention)",
}

# Other SGLang internals slipstream relies on (platform plugin, engine wrapper), with what uses them; the canary
# test imports these too.
RELIED_ON_NAMES: dict[tuple[str, str], str] = {
    ("sglang.srt.platforms.cpu", "CpuDeviceMixin"): "the CPU platform (rollout/sglang_cpu/platform.py)",
    ("sglang.srt.platforms.interface", "SRTPlatform"): "the CPU platform (rollout/sglang_cpu/platform.py)",
    ("sglang.srt.platforms.interface", "PlatformCapabilities"): "the CPU platform (rollout/sglang_cpu/platform.py)",
    ("sglang.srt.platforms.device_mixin", "PlatformEnum"): "the CPU platform (rollout/sglang_cpu/platform.py)",
    ("sglang.srt.model_executor.cuda_graph_config", "with_phase"): "the CPU platform's server-arg defaults",
    ("sglang.srt.plugins", "PLATFORM_PLUGINS_GROUP"): "the platform entry point in pyproject.toml",
    ("sglang.srt.plugins", "GENERAL_PLUGINS_GROUP"): "the patches entry point in pyproject.toml",
    ("sglang.srt.entrypoints.engine", "Engine"): "rollout/engine.py",
    ("sglang.srt.managers.tokenizer_manager", "TokenizerManager"): "rollout/engine.py (abort_request)",
    ("sglang.srt.entrypoints.engine", "_set_envs_and_config"): "rollout/sglang_process.py (CPU engines fork "
                                                               "their scheduler and detokenizer)",
    ("sglang.srt.entrypoints.engine", "kill_process_tree"): "rollout/engine.py (shutdown kills only its own "
                                                            "processes)",
    ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"): "rollout/engine.py (load_bucket)",
    ("sglang.srt.utils", "MultiprocessingSerializer"): "rollout/engine.py (load_bucket)",
    ("sglang.srt.utils", "init_custom_process_group"): "trainer/weight_sync/sender.py (the sending end of a "
                                                       "weight-update group)",
    ("sglang.srt.models.registry", "import_model_classes"): "rollout/sglang_models (SGLANG_EXTERNAL_MODEL_PACKAGE, "
                                                            "set in rollout/engine.py)",
}

_lock = threading.Lock()
_applied = False


def apply_patches() -> None:
    """Installs the weight-push receiver (rollout/weight_receiver.py, on every device: this entry point is how
    it reaches SGLang's scheduler process), then applies patches A to E once per process on CPU only."""
    global _applied
    from rollout import weight_receiver

    weight_receiver.install()
    if torch.cuda.is_available():
        return
    with _lock:
        if _applied:
            return
        _patch_rope()
        _patch_mla_attention_method()
        _patch_dsa_off()
        _patch_batched_attention()
        _patch_glm5_sparse_attention()
        _applied = True
    logger.info("slipstream CPU patches for sglang applied (A rope, B MLA torch_native, C DSA as dense, "
                "D batched attention, E GLM-5 sparse attention)")


def patches_applied() -> bool:
    return _applied


def _import(module: str, attr: str, patch: str):
    """The SGLang internal `module.attr`, or an error naming the patch that must be updated."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"sglang internal {module}.{attr} moved: the CPU plugin patch {patch} must be updated "
            f"(slipstream pins sglang==0.5.23)"
        ) from exc


def _patch_rope() -> None:
    factory = importlib.import_module("sglang.srt.layers.rotary_embedding.factory")
    original = _import(factory.__name__, "get_rope_cpu", "A (rope)")
    generic = _import(factory.__name__, "get_rope", "A (rope)")
    if getattr(original, "_slipstream_patched", False):
        return

    def get_rope_cpu(head_size, rotary_dim, max_position, base, is_neox_style=True, rope_scaling=None,
                     dtype=None, partial_rotary_factor=1.0, device=None):
        scaling_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
        if scaling_type == "deepseek_yarn":
            return original(head_size, rotary_dim, max_position, base, is_neox_style, rope_scaling, dtype,
                            partial_rotary_factor, device)
        # The generic rope is plain torch and builds its cos/sin cache on the default (CPU) device.
        return generic(head_size, rotary_dim, max_position, base, is_neox_style, rope_scaling, dtype,
                       partial_rotary_factor)

    get_rope_cpu._slipstream_patched = True
    get_rope_cpu.__wrapped__ = original
    # get_rope_wrapper looks get_rope_cpu up in the module globals at call time, so this one binding suffices.
    factory.get_rope_cpu = get_rope_cpu


def _patch_mla_attention_method() -> None:
    registry = _import("sglang.srt.models.deepseek_common.attention_backend_handler", "AttentionBackendRegistry",
                       "B (MLA torch_native attention method)")
    method = _import("sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods",
                     "AttnForwardMethod", "B (MLA torch_native attention method)")
    if not hasattr(registry, "register") or not hasattr(method, "MLA"):
        raise RuntimeError("sglang internal AttentionBackendRegistry.register / AttnForwardMethod.MLA moved: the CPU "
                           "plugin patch B must be updated (slipstream pins sglang==0.5.23)")

    def handle_attention_torch_native(attn, forward_batch):
        # The torch-native backend only implements attention over the latent (absorbed) MLA cache.
        return method.MLA

    registry.register("torch_native", handle_attention_torch_native)


def _patch_dsa_off() -> None:
    model_config = importlib.import_module("sglang.srt.configs.model_config")
    original = _import(model_config.__name__, "is_deepseek_dsa", "C (DSA served as dense MLA)")
    if getattr(original, "_slipstream_patched", False):
        return
    warned: set[int] = set()

    def is_deepseek_dsa(config) -> bool:
        from rollout.sglang_cpu.sparse_attention import is_glm5_dsa

        if original(config) and not is_glm5_dsa(getattr(config, "text_config", None) or config):
            _warn_if_context_exceeds_topk(config, warned)
        return False

    is_deepseek_dsa._slipstream_patched = True
    is_deepseek_dsa.__wrapped__ = original
    model_config.is_deepseek_dsa = is_deepseek_dsa
    # `from sglang.srt.configs.model_config import is_deepseek_dsa` made copies in modules already imported;
    # modules imported later bind the patched function. Swap every existing copy of the original. A copy lives in
    # the module's __dict__: looking there, not with getattr, keeps lazy modules' __getattr__ out of it
    # (transformers' imported ~200 submodules, timm among them, for 2.5 s of one core per engine start).
    for module in list(sys.modules.values()):
        if module is None or module is model_config:
            continue
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("is_deepseek_dsa") is original:
            module.is_deepseek_dsa = is_deepseek_dsa


def _warn_if_context_exceeds_topk(config, warned: set[int]) -> None:
    """Dense MLA equals DSA only while context <= index_topk; say so once per config when that may not hold."""
    if id(config) in warned:
        return
    warned.add(id(config))
    text_config = getattr(config, "text_config", None) or config
    topk = getattr(text_config, "index_topk", None)
    max_pos = getattr(text_config, "max_position_embeddings", None)
    if topk is not None and max_pos is not None and max_pos > topk:
        logger.warning(
            "serving a DSA model on CPU as dense MLA: exact only for contexts <= index_topk=%s "
            "(max_position_embeddings=%s); longer contexts attend to all tokens instead of the top-k", topk, max_pos)


def _patch_batched_attention() -> None:
    backend = _import("sglang.srt.layers.attention.torch_native_backend", "TorchNativeAttnBackend",
                      "D (batched attention)")
    decode = getattr(backend, "_run_sdpa_forward_decode", None)
    extend = getattr(backend, "_run_sdpa_forward_extend", None)
    if decode is None or extend is None:
        raise RuntimeError("sglang internal TorchNativeAttnBackend._run_sdpa_forward_decode/_extend moved: the CPU "
                           "plugin patch D must be updated (slipstream pins sglang==0.5.23)")
    if getattr(decode, "_slipstream_patched", False):
        return
    from rollout.sglang_cpu import batched_attention
    from rollout.sglang_cpu.sparse_attention import current_selection

    def _batchable(encoder_lens, sliding_window_size) -> bool:
        return encoder_lens is None and (sliding_window_size is None or sliding_window_size < 0)

    def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 encoder_lens=None, scaling=None, enable_gqa=False, causal=False,
                                 is_cross_attn=False, sliding_window_size=None):
        selected = current_selection()
        if not _batchable(encoder_lens, sliding_window_size):
            _no_selection(selected)
            return decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                          encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
        return batched_attention.decode_attention(query, output, k_cache, v_cache, req_to_token,
                                                  req_pool_indices, seq_lens, scaling, selected)

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                 enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
        selected = current_selection()
        if causal and _batchable(encoder_lens, sliding_window_size) and batched_attention.extend_attention(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
                extend_seq_lens, scaling, selected):
            return output
        _no_selection(selected)
        return extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                      extend_prefix_lens, extend_seq_lens, encoder_lens, scaling, enable_gqa, causal, is_cross_attn,
                      sliding_window_size)

    def _no_selection(selected) -> None:
        if selected is not None:
            raise RuntimeError("GLM-5 sparse attention (patch E) reached an attention SGLang's per-request loop "
                               "serves (encoder, sliding window or non-causal): it cannot apply the top-k selection")

    for name, new, original in (("_run_sdpa_forward_decode", _run_sdpa_forward_decode, decode),
                                ("_run_sdpa_forward_extend", _run_sdpa_forward_extend, extend)):
        new._slipstream_patched = True
        new.__wrapped__ = original
        setattr(backend, name, new)


def _patch_glm5_sparse_attention() -> None:
    attention = _import("sglang.srt.models.deepseek_v2", "DeepseekV2AttentionMLA", "E (GLM-5 sparse attention)")
    original = attention.__init__
    if getattr(original, "_slipstream_patched", False):
        return
    from rollout.sglang_cpu import sparse_attention

    def __init__(self, config, *args, is_nextn: bool = False, **kwargs):
        original(self, config, *args, is_nextn=is_nextn, **kwargs)
        # Multi-token-prediction layers (is_nextn) are not served on CPU; they keep SGLang's dense attention.
        if sparse_attention.is_glm5_dsa(config) and not is_nextn:
            sparse_attention.attach(self, config)

    __init__._slipstream_patched = True
    __init__.__wrapped__ = original
    attention.__init__ = __init__
