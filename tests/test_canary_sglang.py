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
    backend = importlib.import_module("sglang.srt.layers.attention.torch_native_backend").TorchNativeAttnBackend
    head = ["self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices", "seq_lens"]
    for method, args in (("_run_sdpa_forward_decode", head + ["encoder_lens", "scaling"]),
                         ("_run_sdpa_forward_extend", head + ["extend_prefix_lens", "extend_seq_lens",
                                                              "encoder_lens", "scaling"])):
        fn = getattr(backend, method)
        fn = getattr(fn, "__wrapped__", fn)
        assert list(inspect.signature(fn).parameters)[:len(args)] == args, (
            f"sglang internal TorchNativeAttnBackend.{method} changed its arguments: the CPU plugin patch D must "
            f"be updated (pinned sglang=={PIN})")
    attention = importlib.import_module("sglang.srt.models.deepseek_v2").DeepseekV2AttentionMLA
    init = inspect.signature(getattr(attention.__init__, "__wrapped__", attention.__init__)).parameters
    forward = list(inspect.signature(attention.forward).parameters)
    assert "is_nextn" in init and forward[:4] == ["self", "positions", "hidden_states", "forward_batch"], (
        f"sglang internal DeepseekV2AttentionMLA.__init__/forward changed its arguments: the CPU plugin patch E "
        f"must be updated (pinned sglang=={PIN})")
    tm = importlib.import_module("sglang.srt.managers.tokenizer_manager").TokenizerManager
    assert "abort_all" in inspect.signature(tm.abort_request).parameters, "TokenizerManager.abort_request changed"
    engine = importlib.import_module("sglang.srt.entrypoints.engine").Engine
    for method in ("begin_weight_update", "end_weight_update", "update_weights_from_tensor",
                   "update_weights_from_disk", "flush_cache", "generate", "shutdown"):
        assert hasattr(engine, method), f"sglang internal Engine.{method} moved: rollout/engine.py must be updated"


def test_pause_and_version_internals_the_engine_uses():
    """rollout/engine.py pauses SGLang around weight pushes and sets its weight version so the scheduler records
    per-request version spans (meta_info["weight_versions"]); it also runs the Engine's loop in its own thread and
    reroutes Engine.loop.run_until_complete, which every sync Engine method must still go through."""
    tm = importlib.import_module("sglang.srt.managers.tokenizer_manager").TokenizerManager
    for method in ("pause_generation", "continue_generation", "update_weight_version", "abort_request"):
        assert hasattr(tm, method), f"sglang internal TokenizerManager.{method} moved: rollout/engine.py"
    io = importlib.import_module("sglang.srt.managers.io_struct")
    fields = io.UpdateWeightVersionReqInput.__struct_fields__
    assert {"new_version", "abort_all_requests"} <= set(fields), f"UpdateWeightVersionReqInput changed: {fields}"
    assert "mode" in io.PauseGenerationReqInput.__struct_fields__
    scheduler = importlib.import_module("sglang.srt.managers.scheduler").Scheduler
    assert '"in_place", "retract"' in inspect.getsource(scheduler.pause_generation), "pause modes changed"
    spans = importlib.import_module("sglang.srt.utils.weight_versions")
    assert callable(spans.add_weight_versions_to_meta_info) and callable(spans.record_weight_version_events)
    engine = importlib.import_module("sglang.srt.entrypoints.engine").Engine
    assert "self.loop.run_until_complete" in inspect.getsource(engine.update_weights_from_tensor), (
        "Engine methods no longer run through self.loop.run_until_complete: rollout/engine.py's _LoopProxy breaks")


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
    assert getattr(deepseek_v2.DeepseekV2AttentionMLA.__init__, "_slipstream_patched", False), (
        "patch E did not wrap DeepseekV2AttentionMLA.__init__")


def test_platform_empty_cache_does_not_collect(monkeypatch):
    """SGLang's CpuDeviceMixin.empty_cache runs gc.collect(); inherited, it made every weight push's flush_cache
    cost ~480 ms of a ~600 ms push. Our platform must keep overriding it."""
    import gc

    from sglang.srt.platforms.cpu import CpuDeviceMixin

    from rollout.sglang_cpu.platform import SlipstreamCpuPlatform

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a, **k: calls.append(a) or 0)
    CpuDeviceMixin().empty_cache()
    assert calls, "CpuDeviceMixin.empty_cache no longer collects: the override may be unnecessary, re-check it"
    calls.clear()
    SlipstreamCpuPlatform().empty_cache()
    assert not calls, "SlipstreamCpuPlatform.empty_cache runs gc.collect again (a ~0.5 s stall per weight push)"


def test_flush_cache_empties_through_the_platform():
    """The override only takes effect while the scheduler's flush reaches the device layer through
    current_platform.empty_cache(); if SGLang calls gc or torch directly instead, the stall comes back."""
    scheduler = importlib.import_module("sglang.srt.managers.scheduler").Scheduler
    assert "current_platform.empty_cache()" in inspect.getsource(scheduler.flush_cache), (
        "sglang internal Scheduler.flush_cache no longer calls current_platform.empty_cache(): check that a weight "
        f"push does not stall on a cache flush again (rollout/sglang_cpu/platform.py; pinned sglang=={PIN})")


@pytest.mark.parametrize("module,cls,method", __import__("rollout.weight_receiver", fromlist=["x"]).WRAPPED_NAMES,
                         ids=lambda v: str(v))
def test_weight_receiver_wraps_existing_methods(module, cls, method):
    """rollout/weight_receiver.py wraps these in SGLang's scheduler; their signatures are what the wrappers call."""
    owner = _lookup(module, cls, "rollout/weight_receiver.py")
    target = getattr(owner, method, None)
    assert target is not None, f"sglang internal {module}.{cls}.{method} moved: update rollout/weight_receiver.py"
    original = getattr(target, "__wrapped__", target)
    expected = {"load_weights_from_distributed": ["self", "named_tensors"],
                "get_weights_by_name": ["self", "name", "truncate_size"]}[method]
    assert list(inspect.signature(original).parameters) == expected, (
        f"sglang internal {cls}.{method} changed its signature: update rollout/weight_receiver.py")


def test_distributed_receive_hands_bucket_views_to_the_loader():
    """The checksum check in rollout/weight_receiver.py rebuilds the received flat buffer from the storage of the
    tensors SGLang hands on: they must be views of one buffer, loaded through load_weights_from_distributed."""
    updater = importlib.import_module("sglang.srt.model_executor.model_runner_components.weight_updater")
    assert "reconstruct_tensors()" in inspect.getsource(updater.WeightUpdater._receive_bucketed_weights_from_distributed)
    manager = importlib.import_module("sglang.srt.managers.scheduler_components.weight_updater")
    source = inspect.getsource(manager.SchedulerWeightUpdaterManager.update_weights_from_distributed)
    assert "load_weights_from_distributed(weights)" in source, (
        "SGLang no longer loads a distributed receive through WeightUpdater.load_weights_from_distributed: the "
        "bucket checksum check (rollout/weight_receiver.py) would be skipped")
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    bucket = FlattenedTensorBucket.empty(["a", "b"], ["float32", "int64"], [[4], [2]], "cpu")
    views = bucket.reconstruct_tensors()
    assert all(t.untyped_storage().data_ptr() == bucket.get_flattened_tensor().data_ptr() for _, t in views)
