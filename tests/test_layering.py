"""Dependencies point one way (ARCHITECTURE.md): every import in the source, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "aggregator", "common", "predictor", "protocol", "testbed", "bench")
FIRST_PARTY = frozenset(PACKAGES) | {"tests"}
# The first-party packages each package may import (itself included). Nothing but bench imports bench; nothing
# but testbed and bench imports testbed; nothing imports tests.
ALLOWED: dict[str, frozenset[str]] = {
    "protocol": frozenset({"protocol"}),
    "common": frozenset({"common", "protocol"}),
    "predictor": frozenset({"predictor", "common", "protocol"}),
    "agent": frozenset({"agent", "predictor", "common", "protocol"}),
    "aggregator": frozenset({"aggregator", "common", "protocol"}),
    "testbed": frozenset({"testbed", "agent", "aggregator", "common", "predictor", "protocol"}),
    "bench": frozenset(PACKAGES),
}


def module_name(path: Path) -> tuple[str, bool]:
    """Dotted module name of a source file under REPO, and whether it is a package's __init__."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str | None:
    """Absolute name of `from <level dots><target> import ...` inside `module`; None if it climbs above the top."""
    if level == 0:
        return target
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(package):
        return None
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) for every import anywhere in `source`: module level, functions, classes,
    `if TYPE_CHECKING` blocks; plus importlib.import_module / __import__ of a string literal. A relative import
    that climbs above the top-level package is reported as ".." + its dots."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, is_package, node.level, node.module)
            if base is None:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif node.module is None:  # `from . import x`: x may be a submodule
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def violations(source: str, path: str, module: str, is_package: bool = False) -> list[str]:
    """`path:line: ...` for each first-party import that goes against the allowed direction."""
    package = module.split(".")[0]
    allowed = ALLOWED[package]
    problems = []
    for line, target in imports(source, module, is_package):
        if target.startswith("."):
            problems.append(f"{path}:{line}: relative import {target!r} climbs above the {package} package")
            continue
        top = target.split(".")[0]
        if top in FIRST_PARTY and top not in allowed:
            problems.append(
                f"{path}:{line}: {package} imports {target} (a {package} module may import only "
                f"{', '.join(sorted(allowed))})"
            )
    return problems


def source_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    files = source_files(package)
    assert files, f"no Python files found under {package}/"
    problems = []
    for path in files:
        module, is_package = module_name(path)
        problems += violations(path.read_text(), str(path.relative_to(REPO)), module, is_package)
    assert not problems, "imports against the layering of ARCHITECTURE.md:\n" + "\n".join(problems)


def test_the_walker_sees_imports_inside_functions_and_type_checking_blocks() -> None:
    snippet = (
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "from protocol.schemas import ModelSpec\n"
        "if TYPE_CHECKING:\n"
        "    from agent.runner import Launch\n"
        "def measure():\n"
        "    import bench.common as common\n"
        "    class Local:\n"
        "        from testbed import broker\n"
        "    return importlib.import_module('aggregator.service')\n"
    )
    problems = violations(snippet, "predictor/example.py", "predictor.example")
    assert [p.split(": ")[0] for p in problems] == [
        "predictor/example.py:5",
        "predictor/example.py:7",
        "predictor/example.py:9",
        "predictor/example.py:10",
    ]
    assert "predictor imports bench.common" in problems[1]
    assert "common, predictor, protocol" in problems[1]
    assert [p.split(": ")[0] for p in violations(snippet, "t.py", "testbed.example")] == ["t.py:7"]
    assert violations(snippet, "b.py", "bench.example") == []


def test_relative_imports_resolve_to_absolute_names() -> None:
    snippet = "from . import runtime\nfrom .search import configure\nfrom ..common import config\n"
    assert imports(snippet, "predictor", is_package=True) == [
        (1, "predictor.runtime"),
        (2, "predictor.search"),
        (3, "..common"),  # above the top-level package
    ]
    assert imports("from ..features import extract\n", "predictor.sub.mod") == [(1, "predictor.features")]
    assert violations("from ...agent import x\n", "p.py", "predictor.sub.mod")[0].startswith(
        "p.py:1: relative"
    )
