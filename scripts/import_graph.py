"""kdkit's own import graph, from the source (every import, lazy ones inside functions included).

    python scripts/import_graph.py            # package edges, upward imports against kdkit.layers.LAYERS, circles

Used by `tests/test_layering.py`; the layer order itself lives in `kdkit/layers.py`.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kdkit"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The kdkit modules `path` imports (absolute names), at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "kdkit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "kdkit":
                continue
            for a in node.names:  # `from . import checkpoint` names a module, `from .x import f` a name in x
                sub = ROOT.parent / (mod + "." + a.name).replace(".", "/")
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    out.add(f"{mod}.{a.name}")
                else:
                    out.add(mod)
    return out


def module_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def package_of(module: str) -> str:
    """kdkit.train.distiller -> train; kdkit.config -> config (top-level modules are their own unit)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kdkit"


def package_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, deps in module_graph().items():
        src = package_of(mod)
        out.setdefault(src, set())
        out[src] |= {package_of(d) for d in deps if package_of(d) != src}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def upward(graph: dict[str, set[str]], layers: list[list[str]]) -> list[tuple[str, str]]:
    """Edges from a package to one in a higher layer (or to a package missing from the layer list)."""
    level = {p: i for i, row in enumerate(layers) for p in row}
    return sorted((a, b) for a, deps in graph.items() for b in deps
                  if a != "kdkit" and b != "kdkit" and (a not in level or b not in level or level[b] > level[a]))


def main() -> None:
    sys.path.insert(0, str(ROOT.parent))
    from kdkit.layers import LAYERS

    pg = package_graph()
    for a in sorted(pg):
        print(f"{a:12s} -> {', '.join(sorted(pg[a])) or '-'}")
    print("upward imports:", upward(pg, LAYERS) or "none")
    print("package circles:", cycles(pg) or "none")
    print("module circles:", cycles(module_graph()) or "none")


if __name__ == "__main__":
    main()
