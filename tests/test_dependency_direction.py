"""trainer -> rollout -> rewards, and trainer/rollout -> glm5_model: no import against that direction, at module
level or inside functions (a reward plugin must work without engines or Megatron)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "rewards": {"trainer", "rollout", "glm5_model"},
    "rollout": {"trainer"},
    "glm5_model": {"trainer", "rollout", "rewards"},
}


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_dependency_direction(package):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in sorted((ROOT / package).rglob("*.py"))
           for name, line in _imported_packages(path) if name in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)
