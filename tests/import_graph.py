"""The import graph of the `dymu` package, from its source (standard library only).

Reports every intra-package import edge (module level or inside a function), the strongly
connected components with more than one module (import circles), and the function-level
imports. `tests/test_import_graph.py` asserts on it; run it directly for the counts:
`python tests/import_graph.py [--json] [-v]`.
"""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=dict)  # all intra-package imports
    local_imports: list[tuple[str, int, str]] = field(default_factory=list)  # (module, line, imported)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str]) -> list[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(module, is_package, node)
        names = [f"{base}.{alias.name}" for alias in node.names] + [base]
    out = []
    for name in names:
        while name and name not in known:  # `from x import func` resolves to module x
            name = name.rpartition(".")[0]
        if name and name != module and name not in out:
            out.append(name)
    # `from . import a` names submodule a; its parent package is not an edge by itself
    if isinstance(node, ast.ImportFrom) and len(out) > 1:
        base = _resolve(module, is_package, node)
        out = [n for n in out if n != base] or out
    return out


def _in_function_or_guard(tree: ast.AST) -> dict[ast.AST, bool]:
    """Import nodes -> True when inside a def (function-level)."""
    inside: dict[ast.AST, bool] = {}

    def walk(node: ast.AST, in_def: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                inside[child] = in_def
            walk(child, in_def or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(tree, False)
    return inside


def build(package: Path = ROOT / "dymu", root: Path = ROOT) -> Graph:
    graph = Graph()
    for path in sorted(package.rglob("*.py")):
        graph.modules[module_name(path, root)] = path
    known = set(graph.modules)
    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph.edges[name] = set()
        for node, in_def in _in_function_or_guard(tree).items():
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            targets = _targets(name, path.name == "__init__.py", node, known)
            graph.edges[name].update(targets)
            if in_def:
                shown = targets or [a.name for a in node.names] if isinstance(node, ast.Import) else targets
                what = ", ".join(shown) or (getattr(node, "module", None) or "")
                graph.local_imports.append((name, node.lineno, what))
    return graph


def circles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph.edges):
        if v not in index:
            visit(v)
    return found


def main(argv: list[str]) -> int:
    graph = build()
    found = circles(graph)
    lines = {name: len(path.read_text().splitlines()) for name, path in graph.modules.items()}
    data = {
        "modules": len(graph.modules),
        "circles": found,
        "function_level_imports": len(graph.local_imports),
        "function_level_imports_of_dymu": sum(
            1 for _, _, what in graph.local_imports if what.startswith("dymu")
        ),
        "largest_modules": sorted(lines.items(), key=lambda kv: -kv[1])[:8],
    }
    if "--json" in argv:
        print(json.dumps(data, indent=1))
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
        if "-v" in argv:
            for module, line, what in graph.local_imports:
                print(f"  {module}:{line} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
