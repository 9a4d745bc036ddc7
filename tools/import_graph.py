"""The project's import graph: layers, cycles and module sizes, read from the source (no import).

    python tools/import_graph.py            # the package graph, any cycle, upward imports, sizes
    python tools/import_graph.py --modules  # also every module's project imports

Layers, bottom to top: ``kvstore`` (the store and snapshots), ``replay`` (branch replay and MC
values), ``trainer`` (RL on EasyDeL), ``vinekv`` (tasks, CLI, demo). A module may import its own
layer and the ones below; every import counts, also one inside a function.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

LAYERS = ("kvstore", "replay", "trainer", "vinekv")
ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the layers' packages, by dotted name."""
    return {module_name(p, root): p for layer in LAYERS for p in sorted((root / layer).rglob("*.py"))}


def imports_of(path: Path, name: str, known: Iterable[str]) -> set[str]:
    """The project modules ``path`` (module ``name``) imports, anywhere in it."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # ``from package import module`` depends on the module, ``from module import name`` on the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` pairs where a layer imports one above it."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(
        (a, b) for a, targets in edges.items() for b in targets if rank[b.split(".")[0]] > rank[a.split(".")[0]]
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modules", action="store_true", help="list every module's project imports")
    args = parser.parse_args(argv)
    edges = graph()
    packages: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            if a.split(".")[0] != b.split(".")[0]:
                packages.setdefault(a.split(".")[0], set()).add(b.split(".")[0])
    print("layers, bottom to top:", " < ".join(LAYERS))
    for layer in LAYERS:
        print(f"  {layer} imports {', '.join(sorted(packages.get(layer, ()))) or 'no other layer'}")
    up, loops = upward_imports(edges), cycles(edges)
    print(f"upward imports: {len(up)}" + "".join(f"\n  {a} -> {b}" for a, b in up))
    print(f"import cycles: {len(loops)}" + "".join(f"\n  {' <-> '.join(c)}" for c in loops))
    modules = project_modules()
    print("\nlines per module (kvstore):")
    for name, path in modules.items():
        if name.startswith("kvstore"):
            print(f"  {len(path.read_text().splitlines()):5d}  {path.relative_to(ROOT)}")
    if args.modules:
        print()
        for name in sorted(edges):
            print(f"{name}: {', '.join(sorted(edges[name])) or '-'}")
    return 1 if up or loops else 0


if __name__ == "__main__":
    sys.exit(main())
