"""The package's layering: no import cycles between modules, and dependencies point down.

Every ``import`` / ``from ... import`` of a comfyquant module counts, including the ones inside functions
(a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "comfyquant"

# Lower layers never import higher ones. Within one row, packages may use each other only without cycles.
LAYERS = [
    {"errors", "exits", "interrupt", "progress"},
    {"quant"},
    {"formats", "io"},
    {"presets"},
    {"calibration", "optimize", "autoprec"},
    {"runtime"},
    {"lora"},
    {"convert"},
    {"distributed"},
    {"testing"},
    {"eval", "bench", "nodes"},
    {"cli", "__main__", "__init__"},
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("comfyquant"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in mods else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("comfyquant"))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t in _imports(p, mods) if t in mods and t != m} for m, p in mods.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_dependencies_point_down() -> None:
    rank = {pkg: i for i, row in enumerate(LAYERS) for pkg in row}
    bad = []
    for mod, targets in _graph().items():
        src = _top(mod)
        assert src in rank, f"{mod}: package {src!r} has no place in LAYERS"
        for t in targets - {"comfyquant"}:  # the root package holds __version__ and lazy re-exports only
            dst = _top(t)
            if dst != src and rank[dst] > rank[src] and not (src == "__init__" or mod.endswith("__main__")):
                bad.append(f"{mod} -> {t}")
    assert bad == [], "imports that point up: " + "; ".join(sorted(bad))
