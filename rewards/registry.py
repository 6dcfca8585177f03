"""Name -> reward function. Built-ins register on import; outside plugins register through the
`slipstream.rewards` entry-point group (name = reward name, value = "module:function") or load by dotted path
("module:function") or file path ("path/to/plugin.py:function") straight from the config."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
from typing import Any

from rewards.api import RewardFn

_REGISTRY: dict[str, RewardFn] = {}
_EXAMPLES: dict[str, list] = {}
_BATCH_METRICS: dict[str, Any] = {}
ENTRY_POINT_GROUP = "slipstream.rewards"


def register_reward(name: str, examples: list | None = None, batch_metrics=None):
    """Registers an async reward under `name`. `examples` (RewardInputs) are what `python -m rewards check`
    runs the contract tests on; give at least one for a reward that needs labels. `batch_metrics`, if given,
    maps the component dicts of a batch to metrics that are not per-sample means (e.g. a hallucination rate,
    a ratio of counts); runs log them as reward/<name>/<metric>."""

    def decorator(fn: RewardFn) -> RewardFn:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"reward {name!r}: {fn.__qualname__} must be an `async def` function")
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = fn
        if examples:
            _EXAMPLES[name] = list(examples)
        if batch_metrics is not None:
            _BATCH_METRICS[name] = batch_metrics
        return fn

    return decorator


def registered_rewards() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def reward_batch_metrics(name: str):
    """The reward's batch-metrics function, or None."""
    _import_builtins()
    return _BATCH_METRICS.get(name)


def reward_examples(name: str) -> list:
    _import_builtins()
    return list(_EXAMPLES.get(name, []))


_builtins_loaded = False


def _import_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    importlib.import_module("rewards.builtin")
    load_entry_points(ENTRY_POINT_GROUP, "reward plugin", _REGISTRY, lambda name, fn: register_reward(name)(fn))


def load_entry_points(group: str, kind: str, known, register) -> None:
    """`register(name, obj)` for each entry point of `group` whose name is not `known` yet. One that fails to load
    or register is logged and skipped: a broken outside package must not take the built-ins down with it."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        if ep.name in known:
            continue
        try:
            register(ep.name, ep.load())
        except Exception as exc:  # noqa: BLE001
            logging.getLogger(__name__).error("%s %r (%s) failed to load: %r", kind, ep.name, ep.value, exc)


def load_target(name: str, kind: str = "reward", default_attr: str = "reward"):
    """'module:attr' or 'path/to/file.py:attr' (attr defaults to `default_attr` for files). `kind` names what is
    loaded in errors and in the module name a file gets (reward plugins, environments)."""
    target, _, attr = name.rpartition(":") if ":" in name else (name, "", "")
    if target.endswith(".py"):
        from pathlib import Path

        path = Path(target)
        if not path.is_file():
            raise ValueError(f"{kind} {name!r}: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"slipstream_{kind}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return getattr(module, attr or default_attr)
    return getattr(importlib.import_module(target), attr)


def _resolve(name: str) -> RewardFn:
    _import_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name or name.endswith(".py"):  # an outside author's plugin
        try:
            fn = load_target(name)
        except (ImportError, AttributeError, SyntaxError) as exc:
            raise ValueError(f"reward {name!r} could not be loaded: {exc}") from exc
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"reward {name!r} must be an `async def` function")
        return fn
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)} "
                     "(or use 'module:function' / 'path/to/file.py:function')")


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
