"""Canary for the SGLang internals our CPU platform plugin, its patches and the engine wrapper rely on.

sglang is pinned (==0.5.23) because rollout/sglang_cpu/ reaches into its internals. When an upgrade moves one of
them, these tests name the internal and the patch to update, instead of letting the engine serve wrong logprobs.
No skips: a missing sglang is a failure.
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points

import pytest
import torch

import sglang
from rollout.sglang_cpu import patches
from rollout.sglang_cpu.patches import PATCH_OF_NAME, PATCHED_NAMES, RELIED_ON_NAMES

PIN = "0.5.23"


def _lookup(module: str, attr: str, what: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"sglang internal {module} moved (import failed: {exc}): {what} must be updated "
                    f"(pinned sglang=={PIN})")
    if not hasattr(mod, attr):
        pytest.fail(f"sglang internal {module}.{attr} moved: {what} must be updated (pinned sglang=={PIN})")
    return getattr(mod, attr)


def test_sglang_is_the_pinned_version():
    assert sglang.__version__ == PIN, (f"sglang {sglang.__version__} installed, the CPU plugin was written against "
                                       f"{PIN}: re-check every name in rollout/sglang_cpu/patches.py")


@pytest.mark.parametrize("module,attr", PATCHED_NAMES, ids=[f"{m}.{a}" for m, a in PATCHED_NAMES])
def test_patched_internal_exists(module, attr):
    _lookup(module, attr, f"the CPU plugin patch {PATCH_OF_NAME[(module, attr)]}")


@pytest.mark.parametrize("module,attr", list(RELIED_ON_NAMES), ids=[f"{m}.{a}" for m, a in RELIED_ON_NAMES])
def test_relied_on_internal_exists(module, attr):
    _lookup(module, attr, RELIED_ON_NAMES[(module, attr)])


def test_internal_shapes_the_patches_assume():
    factory = importlib.import_module("sglang.srt.layers.rotary_embedding.factory")
    # A: get_rope_wrapper must look get_rope_cpu up at call time (a module global), or rebinding it does nothing.
    assert "get_rope_cpu(" in inspect.getsource(factory.get_rope_wrapper), (
        "sglang internal get_rope_wrapper no longer calls get_rope_cpu: the CPU plugin patch A must be updated "
        f"(pinned sglang=={PIN})")
    handler = importlib.import_module("sglang.srt.models.deepseek_common.attention_backend_handler")
    registry = handler.AttentionBackendRegistry
    assert callable(getattr(registry, "register", None)) and callable(getattr(registry, "get_handler", None)), (
        "sglang internal AttentionBackendRegistry.register/get_handler moved: the CPU plugin patch B must be updated")
    forward_methods = importlib.import_module(
        "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods")
    assert hasattr(forward_methods.AttnForwardMethod, "MLA"), "AttnForwardMethod.MLA moved: patch B must be updated"
    tm = importlib.import_module("sglang.srt.managers.tokenizer_manager").TokenizerManager
    assert "abort_all" in inspect.signature(tm.abort_request).parameters, "TokenizerManager.abort_request changed"
    engine = importlib.import_module("sglang.srt.entrypoints.engine").Engine
    for method in ("begin_weight_update", "end_weight_update", "update_weights_from_tensor",
                   "update_weights_from_disk", "flush_cache", "generate", "shutdown"):
        assert hasattr(engine, method), f"sglang internal Engine.{method} moved: rollout/engine.py must be updated"


def test_entry_points_registered():
    platforms = {ep.name: ep.value for ep in entry_points(group="sglang.srt.platforms")}
    plugins = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert platforms.get("slipstream_cpu") == "rollout.sglang_cpu.platform:activate", platforms
    assert plugins.get("slipstream_cpu_patches") == "rollout.sglang_cpu.patches:apply_patches", plugins


def test_platform_activation_and_class():
    from sglang.srt.platforms import _load_platform_class
    from sglang.srt.platforms.interface import SRTPlatform

    from rollout.sglang_cpu.platform import SlipstreamCpuPlatform, activate

    qualname = activate()
    if torch.cuda.is_available():
        assert qualname is None  # SGLang's CUDA platform serves GPUs
        return
    cls = _load_platform_class(qualname)
    assert cls is SlipstreamCpuPlatform and issubclass(cls, SRTPlatform)
    platform = cls()
    assert platform.is_out_of_tree() and not platform.is_cpu()  # OOT keeps sgl-kernel CPU paths off
    assert platform.device_name == platform.device_type == "cpu"
    assert platform.get_default_attention_backend() == "torch_native"
    assert platform.get_dispatch_key_name() == "native"
    assert not platform.is_pin_memory_available()
    assert platform.get_device() == "cpu"  # a str: SGLang's default-device resolution calls .split(":") on it
    caps = platform.capabilities
    assert not (caps.supports_triton or caps.graph_capture or caps.piecewise_graph or caps.supports_pynccl)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patches are applied only without CUDA")
def test_patches_take_effect():
    patches.apply_patches()
    patches.apply_patches()  # idempotent
    assert patches.patches_applied()
    factory = importlib.import_module("sglang.srt.layers.rotary_embedding.factory")
    assert getattr(factory.get_rope_cpu, "_slipstream_patched", False)
    rope = factory.get_rope_wrapper(16, 16, 64, 10000, False, {"rope_type": "default", "rope_theta": 10000.0},
                                    torch.float32, device="cpu")
    assert rope is not None
    handler = importlib.import_module("sglang.srt.models.deepseek_common.attention_backend_handler")
    forward_methods = importlib.import_module(
        "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods")
    assert handler.AttentionBackendRegistry.get_handler("torch_native")(None, None) == forward_methods.AttnForwardMethod.MLA
    model_config = importlib.import_module("sglang.srt.configs.model_config")
    from transformers import GlmMoeDsaConfig

    glm5 = GlmMoeDsaConfig(index_topk=2048)
    glm5.architectures = ["GlmMoeDsaForCausalLM"]
    assert model_config.is_deepseek_dsa.__wrapped__(glm5), "is_deepseek_dsa no longer recognises GLM-5 (patch C)"
    assert model_config.is_deepseek_dsa(glm5) is False
    deepseek_v2 = importlib.import_module("sglang.srt.models.deepseek_v2")
    assert deepseek_v2.is_deepseek_dsa is model_config.is_deepseek_dsa, "a copy of is_deepseek_dsa was not patched"
