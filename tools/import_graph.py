"""The project's import graph: layers, cycles and module sizes, read from the source (no import).

    python tools/import_graph.py            # the package graph, any cycle, upward imports, sizes
    python tools/import_graph.py --modules  # also every module's project imports

Layers, bottom to top: ``kvstore`` (the store and snapshots), ``replay`` (branch replay and MC
values), ``trainer`` (RL on EasyDeL), ``vinekv`` (tasks, CLI, demo, with ``configs``). Each
folder installs under the one package ``vinekv`` (``kvstore/`` is ``vinekv.kvstore``). A module may
import its own layer and the ones below; every import counts, also one inside a function. An
import of a folder's bare name (``from kvstore import ...``) is an error: nothing installs it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

LAYERS = ("kvstore", "replay", "trainer", "vinekv")
FOLDERS = {"kvstore": "kvstore", "replay": "replay", "trainer": "trainer", "configs": "vinekv", "vinekv": "vinekv"}
"""Each source folder and the layer it belongs to; it installs as ``vinekv.<folder>`` (``vinekv`` itself)."""
ROOT = Path(__file__).resolve().parent.parent


def package_of(folder: str) -> str:
    return "vinekv" if folder == "vinekv" else f"vinekv.{folder}"


def module_name(path: Path, root: Path = ROOT) -> str:
    folder, *parts = path.relative_to(root).with_suffix("").parts
    return ".".join([package_of(folder), *(parts[:-1] if parts[-1] == "__init__" else parts)])


def layer_of(module: str) -> str:
    parts = module.split(".")
    return FOLDERS.get(parts[1], "vinekv") if len(parts) > 1 else "vinekv"


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the layers' folders, by its installed dotted name."""
    return {module_name(p, root): p for folder in FOLDERS for p in sorted((root / folder).rglob("*.py"))}


def bare_imports(root: Path = ROOT) -> list[tuple[str, str]]:
    """``(importer, imported)`` pairs that import a folder by its bare name (not installed)."""
    found = []
    for name, path in project_modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [node.module]
            found += [(name, t) for t in targets if t.split(".")[0] in FOLDERS and t.split(".")[0] != "vinekv"]
    return sorted(found)


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
    return sorted((a, b) for a, targets in edges.items() for b in targets if rank[layer_of(b)] > rank[layer_of(a)])


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
            if layer_of(a) != layer_of(b):
                packages.setdefault(layer_of(a), set()).add(layer_of(b))
    print("layers, bottom to top:", " < ".join(LAYERS))
    for layer in LAYERS:
        print(f"  {layer} imports {', '.join(sorted(packages.get(layer, ()))) or 'no other layer'}")
    up, loops, bare = upward_imports(edges), cycles(edges), bare_imports()
    print(f"upward imports: {len(up)}" + "".join(f"\n  {a} -> {b}" for a, b in up))
    print(f"imports of a bare folder name: {len(bare)}" + "".join(f"\n  {a} -> {b}" for a, b in bare))
    print(f"import cycles: {len(loops)}" + "".join(f"\n  {' <-> '.join(c)}" for c in loops))
    modules = project_modules()
    print("\nlines per module (kvstore):")
    for name, path in modules.items():
        if layer_of(name) == "kvstore":
            print(f"  {len(path.read_text().splitlines()):5d}  {path.relative_to(ROOT)}")
    if args.modules:
        print()
        for name in sorted(edges):
            print(f"{name}: {', '.join(sorted(edges[name])) or '-'}")
    return 1 if up or loops or bare else 0


if __name__ == "__main__":
    sys.exit(main())
