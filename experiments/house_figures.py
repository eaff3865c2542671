"""The package's structure in numbers (issue 32): the largest modules and functions in
lines, and the import circles between cnneb_jax modules (imports at the top or inside a
function both count).

    python experiments/house_figures.py [TREE]     # default: this checkout
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def imports(path: Path, package: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnneb_jax"):
            found |= ({f"cnneb_jax.{a.name}" for a in node.names} if node.module == "cnneb_jax"
                      else {node.module})
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cnneb_jax.")}
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    tree = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    package = tree / "cnneb_jax"
    files = sorted(package.rglob("*.py"))
    modules = {".".join(f.relative_to(tree).with_suffix("").parts): f for f in files}
    sizes = sorted(((len(f.read_text().splitlines()), m) for m, f in modules.items()),
                   reverse=True)
    funcs = []
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{m}.{node.name}"))
    funcs.sort(reverse=True)
    graph = {m: imports(f, package) & set(modules) for m, f in modules.items()}
    print(f"{tree}: {len(modules)} modules, {sum(s for s, _ in sizes)} lines")
    print("largest modules: " + ", ".join(f"{m} {s}" for s, m in sizes[:3]))
    print("largest functions: " + ", ".join(f"{m} {s}" for s, m in funcs[:3]))
    print(f"functions over 60 lines: {sum(s > 60 for s, _ in funcs)}")
    found = circles(graph)
    print(f"import circles: {len(found)}" + "".join(f"\n  {' <-> '.join(g)}" for g in found))


if __name__ == "__main__":
    main()
