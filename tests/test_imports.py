"""The import graph of the project's modules goes one way: no module imports, directly or through
others, a module that imports it. Every import of a project module counts, wherever it stands
in the file (read with `ast`, nothing is imported), so an import hidden inside a function to
dodge a circle is still found. And those imports stand at the top of the module.

`python tests/test_imports.py` prints the layers, lowest first: each module imports only modules
of the layers before its own.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {project module it imports: the line of the first such import}."""
    graph = {}
    for name in MODULES:
        tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
        edges = {}
        for node in ast.walk(tree):
            for target in imported_names(node):
                if target in MODULES and target != name:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        path.pop()
        return None

    for m in MODULES:
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def layers(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Modules by depth: layer 0 imports no project module, layer k only modules of layers < k."""
    depth: dict[str, int] = {}
    while len(depth) < len(graph):
        ready = [m for m in MODULES if m not in depth and all(n in depth for n in graph[m])]
        assert ready, f"no layering: an import cycle among {sorted(set(graph) - set(depth))}"
        for m in ready:
            depth[m] = 1 + max((depth[n] for n in graph[m]), default=-1)
    return [[m for m in MODULES if depth[m] == k] for k in range(max(depth.values()) + 1)]


def test_the_module_imports_form_no_cycle():
    graph = import_graph()
    assert {"fileio", "grading", "tasks", "sources", "eval", "train"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_project_modules_are_imported_at_the_top():
    inside = []
    for name in MODULES:
        tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
        top = set(tree.body)
        for node in ast.walk(tree):
            if node not in top and any(t in MODULES for t in imported_names(node)):
                inside.append(f"{name}.py:{node.lineno}")
    assert not inside, f"project imports inside functions or blocks: {inside}"


def test_the_layers_follow_the_method():
    """The low-level helpers import nothing of ours; the experiment sits above what it uses."""
    depth = {m: k for k, layer in enumerate(layers(import_graph())) for m in layer}
    for helper in ("devices", "fileio", "grading", "stats", "tokenizer"):
        assert depth[helper] == 0, helper
    assert depth["data"] < depth["nll"] < depth["sources"] < depth["perplexity"] < depth["eval"] \
        < depth["train"] < depth["study"]
    assert depth["tasks"] < depth["sources"] and depth["generation"] < depth["sources"]


if __name__ == "__main__":
    for k, layer in enumerate(layers(import_graph())):
        print(f"{k}: {', '.join(layer)}")
    sys.exit(1 if find_cycle(import_graph()) else 0)
