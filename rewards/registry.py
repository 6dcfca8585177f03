"""Name -> reward function. Built-ins register on import; outside plugins load by dotted path."""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from rewards.api import RewardFn

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str):
    def decorator(fn: RewardFn) -> RewardFn:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"reward {name!r}: {fn.__qualname__} must be an `async def` function")
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_rewards() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def _import_builtins() -> None:
    importlib.import_module("rewards.builtin")


def _resolve(name: str) -> RewardFn:
    _import_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:  # "package.module:function" -- an outside author's plugin
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward {name!r} could not be loaded: {exc}") from exc
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"reward {name!r} must be an `async def` function")
        return fn
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)} (or use 'module:function')")


def get_reward(name: str) -> RewardFn:
    return _resolve(name)


def load_reward(name: str, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """The reward with its configured keyword arguments bound; unknown arguments are an error now, not mid-run."""
    fn = _resolve(name)
    kwargs = dict(kwargs or {})
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not accepts_any]
    if unknown:
        raise ValueError(f"reward {name!r} does not take argument(s) {unknown}; it takes {list(params)[1:]}")
    return functools.partial(fn, **kwargs) if kwargs else fn
