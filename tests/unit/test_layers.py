"""The module graph: imports point down the layers of pyproject.toml and nothing cycles.

The same rules as ``lint-imports`` (``make lint``), checked with ``ast`` so that ``pytest``
alone catches a break: every import statement counts, those inside functions (a lazy import
is still an edge of the graph) and under ``TYPE_CHECKING`` too. The layers are read from
``[tool.importlinter]``, declared once.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "mpsserve"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str:
    """The module that ``name`` (a module, or a name imported from one) lives in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    for alias in node.names:  # `from mpsserve import metrics` imports a module
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[module].read_text())
    names = {
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in _imported(module, node)
    }
    return {_owner(n) for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")} - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def _layers() -> list[list[str]]:
    """``[tool.importlinter]``'s layers contract, top first; each a list of its siblings."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [[part.strip() for part in layer.split("|")] for layer in layers]


def _place(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(layer index, the sibling holding ``module``), None for the root package."""
    for index, siblings in enumerate(layers):
        for sibling in siblings:
            if module == sibling or module.startswith(sibling + "."):
                return index, sibling
    return None


def test_every_module_has_a_layer() -> None:
    layers = _layers()
    assert [m for m in sorted(MODULES) if m != PACKAGE and _place(m, layers) is None] == []


def test_imports_point_down_the_layers() -> None:
    layers = _layers()
    wrong = []
    for importer, imported in sorted((a, b) for a, bs in GRAPH.items() for b in bs):
        here, there = _place(importer, layers), _place(imported, layers)
        if here is None or there is None:
            continue  # the root package holds only __version__
        if there[0] < here[0] or (there[0] == here[0] and there[1] != here[1]):
            wrong.append(f"{importer} -> {imported}")
    assert wrong == []


def _cycle_from(start: str) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one (depth first)."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        module, path = stack.pop()
        for imported in sorted(GRAPH[module]):
            if imported == start:
                return [*path, start]
            if imported not in seen:
                seen.add(imported)
                stack.append((imported, [*path, imported]))
    return None


def test_no_import_cycles() -> None:
    cycles = [cycle for m in sorted(MODULES) if (cycle := _cycle_from(m)) is not None]
    assert cycles == []


def test_the_checks_see_lazy_imports() -> None:
    """A function-level import is an edge: the CLI imports its commands lazily."""
    assert "mpsserve.ops.audit" in GRAPH["mpsserve.ops.cli"]
