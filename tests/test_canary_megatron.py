"""Fails loudly when a megatron-core internal that glm5_model/compat.py relies on has moved."""
from __future__ import annotations

import importlib
from importlib.metadata import version

import pytest

from glm5_model.compat import MEGATRON_INTERNALS

PINNED = "0.16.1"


def test_megatron_version_is_the_pinned_one():
    assert version("megatron-core") == PINNED, (
        f"megatron-core {version('megatron-core')} is installed but the CPU compatibility layer was written "
        f"against {PINNED}; re-check glm5_model/compat.py before changing the pin")


@pytest.mark.parametrize("module, attr", MEGATRON_INTERNALS, ids=[f"{m}.{a}" for m, a in MEGATRON_INTERNALS])
def test_megatron_internal_still_exists(module, attr):
    from glm5_model.compat import install_compat

    install_compat()
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"megatron internal module {module} moved ({exc}): update glm5_model/compat.py "
                    f"(pinned megatron-core=={PINNED})")
    assert hasattr(mod, attr), (f"megatron internal {module}.{attr} moved: the CPU compatibility shim that "
                                f"uses it must be updated (pinned megatron-core=={PINNED})")
