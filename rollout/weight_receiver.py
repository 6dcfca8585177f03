"""The receiving end of a weight push inside SGLang's scheduler process (pinned sglang==0.5.23).

SGLang's flattened-bucket broadcast (`update_weights_from_distributed`) hands the received tensors straight to
the model loader, and SGLang has no call that returns a weight's bytes in checkpoint (HF) naming. Two small
wrappers, installed in every SGLang process by the plugin entry point (rollout/sglang_cpu/patches.py calls
`install()` on CPU and GPU alike), add what a verified push needs:

- `WeightUpdater.load_weights_from_distributed`: strips the protocol entries of a bucket
  (rollout/weight_protocol.py), checks its checksum, version and size against the bytes actually received, and
  refuses the bucket (an error message, nothing loaded) when they differ. On success the message carries
  VERIFIED_MARKER, so the engine knows the check ran.
- `WeightExporter.get_weights_by_name`: a name starting with READBACK_PREFIX is a read-back request (a JSON
  body): the checksum of each named HF tensor, read from the engine's parameters, plus how much of every engine
  parameter those tensors cover, written as JSON to the file the request names (same host: the scheduler is a
  child of the engine process). Any other name goes to SGLang unchanged.

`engine_region` knows how SGLang lays out GLM-5 (DeepseekV2-family) weights on one tensor-parallel rank: fused
q_a + kv_a projection, fused gate/up projections, experts stacked in w13 (gate rows, then up rows) and w2; every
other tensor under its HF name. tests/rollout/test_weight_receiver.py checks it against a freshly loaded engine.
"""
from __future__ import annotations

import json
import logging
import re
import threading

import torch

from rollout.weight_protocol import (CHECK_NAME, PROTOCOL_PREFIX, READBACK_PREFIX, VERIFIED_MARKER, checksum,
                                     verify_check)

logger = logging.getLogger(__name__)

WRAPPED_NAMES: list[tuple[str, str, str]] = [
    ("sglang.srt.model_executor.model_runner_components.weight_updater", "WeightUpdater",
     "load_weights_from_distributed"),
    ("sglang.srt.model_executor.model_runner_components.weight_exporter", "WeightExporter", "get_weights_by_name"),
]

_lock = threading.Lock()
_installed = False


def install() -> None:
    """Wraps the two SGLang methods once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        import importlib

        (upd_mod, upd_cls, upd_attr), (exp_mod, exp_cls, exp_attr) = WRAPPED_NAMES
        updater = getattr(importlib.import_module(upd_mod), upd_cls)
        exporter = getattr(importlib.import_module(exp_mod), exp_cls)
        updater.load_weights_from_distributed = _verified_load(getattr(updater, upd_attr))
        exporter.get_weights_by_name = _readback_or(getattr(exporter, exp_attr))
        _installed = True


def installed() -> bool:
    return _installed


def _verified_load(original):
    def load_weights_from_distributed(self, named_tensors):
        weights = [(n, t) for n, t in named_tensors if not n.startswith(PROTOCOL_PREFIX)]
        checks = [t for n, t in named_tensors if n == CHECK_NAME]
        if not checks:  # not a slipstream bucket
            return original(self, named_tensors)
        check = checks[0]
        storage = check.untyped_storage()
        flat = torch.empty(0, dtype=torch.uint8, device=check.device).set_(storage, 0, (storage.nbytes(),))
        try:
            verify_check(flat, check.storage_offset() * check.element_size(), check)
        except ValueError as exc:
            logger.error("refused a weight bucket: %s", exc)
            return False, f"slipstream: refused the bucket, nothing of it loaded: {exc}"
        success, message = original(self, weights)
        if success:
            version, index = (int(x) for x in check[:2].tolist())
            message = f"{VERIFIED_MARKER} bucket {index} of version {version}: {message}"
        return success, message

    load_weights_from_distributed.__wrapped__ = original
    return load_weights_from_distributed


def _readback_or(original):
    def get_weights_by_name(self, name: str, truncate_size: int = 100):
        if not name.startswith(READBACK_PREFIX):
            return original(self, name, truncate_size)
        request = json.loads(name[len(READBACK_PREFIX):])
        try:
            result = read_back(dict(self.get_model().named_parameters()), request["tensors"],
                               request.get("hash", True), request.get("algorithm"))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, never allowed to stop the scheduler
            logger.exception("weight read-back failed")
            result = {"error": f"{type(exc).__name__}: {exc}"}
        with open(request["path"], "w") as f:
            json.dump(result, f)
        return [float(len(result.get("checksums", {})))]

    get_weights_by_name.__wrapped__ = original
    return get_weights_by_name


@torch.no_grad()
def read_back(params: dict[str, torch.Tensor], tensors: list[list], hash_regions: bool = True,
              algorithm: str | None = None) -> dict:
    """{"checksums": {hf name: checksum}, "unmapped": [hf names], "uncovered": {engine param: elements not
    covered by any requested tensor}} for requests [hf name, dtype, shape]. Each engine region is cast to the
    requested dtype before hashing (a bf16 value held in an fp32 engine parameter hashes as that bf16), by the
    sender's checksum `algorithm` (rollout/weight_protocol.py). Without `hash_regions` only the placement is
    reported (which tensors the engine holds at all)."""
    checksums, unmapped = {}, []
    covered = {n: 0 for n in params}
    for name, dtype, shape in tensors:
        found = engine_region(params, name, tuple(shape))
        if found is None:
            unmapped.append(name)
            continue
        param_name, region = found
        covered[param_name] += region.numel()
        if hash_regions:
            checksums[name] = checksum(region.to(getattr(torch, dtype)), algorithm)
    uncovered = {n: params[n].numel() - c for n, c in covered.items() if c != params[n].numel()}
    return {"checksums": checksums, "unmapped": unmapped, "uncovered": uncovered}


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# HF suffix -> (engine suffix, which rows of the engine tensor): SGLang concatenates these along dim 0.
_FUSED = {
    "self_attn.q_a_proj.weight": ("self_attn.fused_qkv_a_proj_with_mqa.weight", "first"),
    "self_attn.kv_a_proj_with_mqa.weight": ("self_attn.fused_qkv_a_proj_with_mqa.weight", "last"),
    "gate_proj.weight": ("gate_up_proj.weight", "first"),
    "up_proj.weight": ("gate_up_proj.weight", "last"),
}


def engine_region(params: dict[str, torch.Tensor], hf_name: str,
                  shape: tuple[int, ...]) -> tuple[str, torch.Tensor] | None:
    """(engine parameter name, the view of it that holds HF tensor `hf_name` of `shape`), or None."""
    if hf_name in params:
        param = params[hf_name]
        return (hf_name, param) if tuple(param.shape) == shape else None
    expert = _EXPERT.match(hf_name)
    if expert:
        base, index, kind = expert.group(1), int(expert.group(2)), expert.group(3)
        name = f"{base}.w2_weight" if kind == "down_proj" else f"{base}.w13_weight"
        if name not in params or index >= params[name].shape[0]:
            return None
        stacked = params[name][index]
        part = "whole" if kind == "down_proj" else ("first" if kind == "gate_proj" else "last")
        region = _rows(stacked, part, shape)
        return (name, region) if region is not None else None
    for hf_suffix, (engine_suffix, part) in _FUSED.items():
        if hf_name.endswith("." + hf_suffix):
            name = hf_name[:-len(hf_suffix)] + engine_suffix
            if name in params:
                region = _rows(params[name], part, shape)
                return (name, region) if region is not None else None
    return None


def _rows(tensor: torch.Tensor, part: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    rows = shape[0] if shape else 0
    if part == "whole":
        region = tensor
    elif part == "first":
        region = tensor[:rows]
    else:
        region = tensor[tensor.shape[0] - rows:]
    return region if tuple(region.shape) == shape else None
