"""The import graph of the project's packages, and the circles in it.

``python -m tools.imports [PACKAGE ...]`` prints one line per module, with the project
modules it imports, then the circles (none, we hope). Every import counts, those under
``if TYPE_CHECKING:`` too: a circle hidden from the interpreter is still one a reader
has to hold in mind. ``tests/test_imports.py`` keeps the graph free of circles.
"""

from __future__ import annotations

import ast
import graphlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("qvdformat", "qvdproc", "qvdfs", "qvdctl")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """The modules ``module`` names in its import statements, made absolute."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Each module of ``packages`` -> the modules of ``packages`` it imports."""
    files = {module_name(p): p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[module] = {name for name in _imported(tree, module, path.name == "__init__.py")
                         if name in files and name != module}
    return edges


def circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``edges`` (its modules, the first repeated last), or None."""
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def main(argv: list[str]) -> int:
    edges = graph(tuple(argv) or PACKAGES)
    for module in sorted(edges):
        print(f"{module}: {' '.join(sorted(edges[module])) or '-'}")
    found = circle(edges)
    print("circle: " + " -> ".join(found) if found else "no circle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
