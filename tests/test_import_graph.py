"""The package's import graph: no module-level cycles, and a torch-free runtime.

Why: a cycle between modules (a imports b, b imports a, even inside a function) makes the import
order matter and hides which module owns what; the runtime ships to line-side devices without
torch, so none of its modules may import torch when loaded. Both are checked statically (ast), so
the test is fast and needs none of the optional extras. (tests/test_bundle.py and
tests/test_export_e2e.py also import the runtime in a subprocess with torch blocked.)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the import name it is installed under (pyproject.toml's package-dir).
PACKAGES = {"o2n_edge": "o2n_edge", "export": "o2n_edge.export", "runtime": "o2n_edge.runtime"}


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted import name -> source file."""
    out: dict[str, Path] = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, *, top_level_only: bool = False):
    """(imported module name, line) of every import statement, skipping ``if TYPE_CHECKING:``
    blocks; with ``top_level_only`` also skipping function bodies (what runs at import time)."""
    package = module if is_package else module.rpartition(".")[0]
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield source, node.lineno
            for alias in node.names:  # ``from pkg import submodule``
                yield f"{source}.{alias.name}", node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in it, functions included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {t for t, _ in _imports(tree, name, path.name == "__init__.py")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_sees_every_folder() -> None:
    graph = import_graph()
    assert "o2n_edge.runtime.pipeline" in graph and "o2n_edge.export.build" in graph
    assert "o2n_edge.diffusion.models" in graph["o2n_edge.diffusion.augment"]


def test_find_cycles_reports_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    detail = []
    for comp in cycles:
        members = set(comp)
        detail.append(" <-> ".join(comp) + "\n    edges: " + "; ".join(
            f"{a} -> {b}" for a in comp for b in sorted(graph[a] & members)))
    assert not cycles, "import cycles:\n  " + "\n  ".join(detail)


def test_no_runtime_module_imports_torch_when_loaded() -> None:
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("o2n_edge.runtime"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for target, line in _imports(tree, name, path.name == "__init__.py", top_level_only=True):
            if target == "torch" or target.startswith("torch."):
                offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, "the runtime imports torch at module level: " + ", ".join(offenders)



def test_data_flows_one_way() -> None:
    """The line side never reaches back into the offline stage: the runtime imports no exporter,
    diffusion, encoder, evaluation or CLI module (a bundle is written and read by the runtime's own
    bundle writer and manifest, which the exporter uses too)."""
    graph = import_graph()
    upstream = ("o2n_edge.export", "o2n_edge.diffusion", "o2n_edge.encoders", "o2n_edge.cli", "o2n_edge.evaluation")
    offenders = sorted(f"{mod} -> {dep}" for mod, deps in graph.items() if mod.startswith("o2n_edge.runtime")
                       for dep in deps if dep.startswith(upstream))
    assert not offenders, "the runtime imports the offline stage:\n" + "\n".join(offenders)
