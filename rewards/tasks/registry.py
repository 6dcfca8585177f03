"""Name -> task family. Built-ins register on import; outside packages through the `slipstream.tasks`
entry-point group (value: "module:family_object", a TaskFamily)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from rewards.envs.api import Task
from rewards.envs.registry import checked_tasks
from rewards.registry import load_entry_points

ENTRY_POINT_GROUP = "slipstream.tasks"

_REGISTRY: dict[str, "TaskFamily"] = {}
_builtins_loaded = False


@dataclass(frozen=True)
class TaskFamily:
    """`generate(split, count, seed)` gives `count` distinct tasks of `split` ("train" or "heldout"; no task is in
    both, whatever the seed), each with `data` = the label `reward` scores it by. `demonstrate(task)` is the
    response a good policy gives (the warm-up's target), or None for tasks the warm-up should not teach."""

    name: str
    generate_fn: Callable[[str, int, int], list[Task]]
    reward: str
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    demonstrate: Callable[[Task], str | None] = lambda task: None

    def generate(self, split: str, count: int, seed: int = 0) -> list[Task]:
        return checked_tasks(f"task family {self.name!r}", self.generate_fn, split, count, seed)


def register_task_family(family: TaskFamily) -> TaskFamily:
    existing = _REGISTRY.get(family.name)
    if existing is not None and existing is not family:
        raise ValueError(f"task family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def registered_task_families() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def load_task_family(name: str) -> TaskFamily:
    _import_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task family {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def _import_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    importlib.import_module("rewards.tasks.builtin")

    def register(name: str, obj: Any) -> None:
        if not isinstance(obj, TaskFamily):
            raise TypeError(f"entry point {name!r} is not a rewards.tasks.TaskFamily")
        register_task_family(obj)

    load_entry_points(ENTRY_POINT_GROUP, "task family", _REGISTRY, register)
