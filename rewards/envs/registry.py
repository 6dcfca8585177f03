"""Name -> environment, like reward plugins: built-ins register on import; outside packages register through the
`slipstream.envs` entry-point group (name = env name, value = "module:Class" or "module:factory"); a config may
also name "module:Class" or "path/to/file.py:Class" directly.

An environment is a class (or a plain or async function) that makes one fresh environment object per episode from
the config's keyword arguments. Its tasks come from the dataset, or from a task generator
`generate_tasks(split, count, seed) -> list[Task]` given to `register_env(..., tasks=...)` or defined on the class.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from rewards.envs.api import Task
from rewards.registry import load_entry_points, load_target

ENTRY_POINT_GROUP = "slipstream.envs"
SPLITS = ("train", "heldout")

TaskGenerator = Callable[[str, int, int], list[Task]]
EnvFactory = Callable[..., Any]
# A demonstration policy: the next assistant message given the task (its hidden data too) and the conversation
# so far; what a warm-up teaches before RL (trainer/warmup.py). None for the first turn of a task it does not
# demonstrate (tasks left for RL).
Expert = Callable[[Task, list[dict[str, Any]]], dict[str, Any] | None]

_REGISTRY: dict[str, "EnvSpec"] = {}
_builtins_loaded = False


@dataclass(frozen=True)
class EnvSpec:
    """A loadable environment: `make()` gives one episode's environment (a coroutine result is awaited by the
    runner), with the configured `kwargs` bound."""

    name: str
    factory: EnvFactory
    tasks: TaskGenerator | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    expert: Expert | None = None

    def make(self) -> Any:
        return self.factory(**self.kwargs)

    def generate_tasks(self, split: str, count: int, seed: int = 0) -> list[Task]:
        if self.tasks is None:
            raise ValueError(f"environment {self.name!r} has no task generator; its tasks come from the dataset")
        return checked_tasks(f"environment {self.name!r}", self.tasks, split, count, seed)


def checked_tasks(owner: str, generator: TaskGenerator, split: str, count: int, seed: int) -> list[Task]:
    """`generator(split, count, seed)`, with the arguments and the result checked (`owner` names it in errors)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    tasks = generator(split, count, seed)
    if len(tasks) != count or not all(isinstance(t, Task) for t in tasks):
        raise TypeError(f"{owner}: its task generator must return {count} Tasks")
    return tasks


def register_env(name: str, tasks: TaskGenerator | None = None, expert: Expert | None = None):
    """Registers an environment class or factory under `name`, with an optional task generator and an optional
    demonstration policy (`expert`)."""

    def decorator(factory: EnvFactory) -> EnvFactory:
        _check_factory(name, factory)
        existing = _REGISTRY.get(name)
        if existing is not None and existing.factory is not factory:
            raise ValueError(f"environment {name!r} is already registered by {existing.factory.__module__}")
        _REGISTRY[name] = EnvSpec(name, factory, tasks or getattr(factory, "generate_tasks", None), {},
                                  expert or getattr(factory, "expert", None))
        return factory

    return decorator


def registered_envs() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def load_env(name: str, kwargs: dict[str, Any] | None = None) -> EnvSpec:
    """The environment `name` (registered, 'module:Class' or 'path/file.py:Class') with its keyword arguments
    bound; unknown arguments are an error now, not mid-run."""
    spec = _resolve(name)
    kwargs = dict(kwargs or {})
    params = inspect.signature(spec.factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise ValueError(f"environment {name!r} does not take argument(s) {unknown}; it takes {list(params)}")
    return EnvSpec(spec.name, spec.factory, spec.tasks, kwargs, spec.expert)


def _resolve(name: str) -> EnvSpec:
    _import_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name or name.endswith(".py"):
        try:
            factory = load_target(name, kind="env", default_attr="Env")
        except (ImportError, AttributeError, SyntaxError) as exc:
            raise ValueError(f"environment {name!r} could not be loaded: {exc}") from exc
        _check_factory(name, factory)
        return EnvSpec(name, factory, getattr(factory, "generate_tasks", None), {}, getattr(factory, "expert", None))
    raise ValueError(f"unknown environment {name!r}; registered: {sorted(_REGISTRY)} "
                     "(or use 'module:Class' / 'path/to/file.py:Class')")


def _check_factory(name: str, factory: Any) -> None:
    if not callable(factory):
        raise TypeError(f"environment {name!r}: {factory!r} is not a class or a function")
    if inspect.isclass(factory):
        missing = [m for m in ("reset", "step", "outcome")
                   if not inspect.iscoroutinefunction(getattr(factory, m, None))]
        if missing:
            raise TypeError(f"environment {name!r}: {factory.__qualname__} needs `async def` methods {missing}")


def _import_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    importlib.import_module("rewards.envs.builtin")
    load_entry_points(ENTRY_POINT_GROUP, "environment", _REGISTRY, lambda name, obj: register_env(name)(obj))
