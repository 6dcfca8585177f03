"""The test shapes the `coding` reward supports, checked when a label is loaded (before any code runs).

Supported:
  * assert-style: Python statements run top to bottom, e.g. `assert add(1, 2) == 3`; the test passes when they all
    run without an exception. It must hold a check that runs: an `assert` or `raise` at module level, or a call at
    module level of a function that the test or the label's `entry` defines (`check(add)`).
  * HumanEval-style: the test defines `check(candidate)` and the label names the `entry_point`; the judge calls
    `check(<the solution's entry_point function>)` after running the test's module code.
Refused with a ValueError naming the test: code that does not parse; `import solution` / `from solution import`;
unittest.TestCase classes and any test whose checks never run (pytest-style `def test_x()` with nothing calling
it, `def check(candidate)` without an entry_point); a test with no `assert` or `raise` anywhere (it could not fail).

A test's names that neither the test nor `entry` defines and that are not builtins come from the solution: its
functions as proxies (calls cross as plain data), its plain-data globals as copies, its imported modules as the
judge's own copy. Builtins always mean the builtin (a solution cannot redefine `abs` for the test).
"""
from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass

_BUILTIN_NAMES = frozenset(dir(builtins))
SHAPES_HELP = ("a test is Python statements such as `assert f(x) == y`, or `def check(candidate)` with the label's "
               "'entry_point' naming the function under test")


@dataclass(frozen=True)
class TestPlan:
    """What the judge needs of one test: the names it takes from the solution."""

    solution_names: list[str]


def _parse(code: str, what: str) -> ast.Module:
    try:
        return ast.parse(code, filename=what)
    except SyntaxError as exc:
        raise ValueError(f"coding reward: {what} is not valid Python: {exc.msg} (line {exc.lineno})") from None


def _module_level(tree: ast.Module):
    """Nodes of the module's own statements, not inside function or class bodies."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _defined_functions(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _refuse(index: int, why: str) -> ValueError:
    return ValueError(f"coding reward: test {index} is not a supported shape: {why}; {SHAPES_HELP}")


def _check_shape(index: int, tree: ast.Module, entry_tree: ast.Module, entry_point: str | None) -> None:
    everything = [*ast.walk(tree), *ast.walk(entry_tree)]
    for node in everything:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "solution" or \
                isinstance(node, ast.Import) and any(a.name.split(".")[0] == "solution" for a in node.names):
            raise _refuse(index, "it imports the solution as a module (the solution's functions are plain names "
                                 "in a test)")
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Name) and b.id.endswith("TestCase")) or
                (isinstance(b, ast.Attribute) and b.attr.endswith("TestCase")) for b in node.bases):
            raise _refuse(index, "unittest.TestCase classes are not run")
    if not any(isinstance(n, (ast.Assert, ast.Raise)) for n in everything):
        raise _refuse(index, "it has no assert or raise, so it could not fail")
    functions = _defined_functions(tree) | _defined_functions(entry_tree)
    if entry_point:
        if "check" not in functions:
            raise _refuse(index, f"the label names entry_point {entry_point!r} but the test defines no check()")
        return
    top = [*_module_level(tree), *_module_level(entry_tree)]
    if any(isinstance(n, (ast.Assert, ast.Raise)) for n in top):
        return
    called = {n.func.id for n in top if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    if not called & functions:
        hint = " (give the label an 'entry_point' to run check(candidate))" if "check" in functions else ""
        raise _refuse(index, f"its checks never run: no assert at module level and nothing calls "
                             f"{sorted(functions) or 'a function it defines'}{hint}")


def _free_names(*trees: ast.Module) -> set[str]:
    """Every name the code reads (an over-approximation of its globals is fine: the solution is asked for each)."""
    return {n.id for tree in trees for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def plan_tests(tests: list[str], entry: str, entry_point: str | None) -> list[TestPlan]:
    """Check every test's shape and work out the names it takes from the solution; ValueError if unsupported."""
    if entry_point is not None and not (isinstance(entry_point, str) and entry_point.isidentifier()):
        raise ValueError(f"coding reward: 'entry_point' must be a function name, got {entry_point!r}")
    entry_tree = _parse(entry, "the label's entry code")
    plans = []
    for index, test in enumerate(tests):
        tree = _parse(test, f"test {index}")
        _check_shape(index, tree, entry_tree, entry_point)
        names = (_free_names(tree, entry_tree) - _BUILTIN_NAMES) | ({entry_point} if entry_point else set())
        plans.append(TestPlan(sorted(names)))
    return plans
