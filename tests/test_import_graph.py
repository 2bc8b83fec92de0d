"""The package's modules form layers: its import graph has no cycle, and no module hides an import of another
package module inside a function (the usual way to dodge a cycle)."""

import ast
import os
from typing import Dict, List, Optional, Set, Tuple

PACKAGE = "dphubert_fairseq"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules() -> Dict[str, str]:
    """Dotted module name -> file, for every .py file of the package (``a.b`` for ``a/b/__init__.py``)."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(folder, name)
    return out


def _is_package(module: str, modules: Dict[str, str]) -> bool:
    return modules[module].endswith("__init__.py")


def _imported(module: str, node: ast.AST, modules: Dict[str, str]) -> List[str]:
    """The package modules an ``import`` / ``from ... import`` node of ``module`` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if _is_package(module, modules) else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    names = [f"{target}.{alias.name}" for alias in node.names]
    submodules = [name for name in names if name in modules]
    # names that are not submodules come from the module ``target`` itself
    return submodules + ([target] if len(submodules) < len(names) else [])


def _edges(module: str, target: str, modules: Dict[str, str]) -> Set[str]:
    """Importing ``target`` runs it and the ``__init__`` of every package above it, except the packages
    ``module`` itself is in (already being imported) and the top-level package (its ``__init__`` only gathers
    the public names)."""
    out = set()
    parts = target.split(".")
    for i in range(2, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in modules and name != module and not module.startswith(name + "."):
            out.add(name)
    if target == PACKAGE and module != PACKAGE:
        out.add(PACKAGE)
    return out


def _graph() -> Tuple[Dict[str, Set[str]], List[str]]:
    """The import graph, and every import of a package module made inside a function."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    local_imports = []
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_function = {id(n) for fn in functions for n in ast.walk(fn) if n is not fn}
        for node in ast.walk(tree):
            for target in _imported(module, node, modules):
                graph[module] |= _edges(module, target, modules)
                if id(node) in in_function:
                    local_imports.append(f"{path}:{node.lineno}: imports {target} inside a function")
    return graph, local_imports


def _cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_sees_the_package():
    graph, _ = _graph()
    assert {"dphubert_fairseq.param_count", "dphubert_fairseq.models.dphubert"} <= set(graph)
    assert "dphubert_fairseq.param_count" in graph["dphubert_fairseq.models.dphubert"]
    assert "dphubert_fairseq.models.dphubert" in graph["dphubert_fairseq.teacher"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycle():
    graph, _ = _graph()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_local_import_of_a_package_module():
    _, local_imports = _graph()
    assert not local_imports, "\n".join(local_imports)


def test_bottom_layer_imports_nothing_above_it():
    """errors, conv_spec, param_count, latency and macs are arithmetic and definitions (atomic_files: how a
    file is written): they import no model, loader or fairseq-facing module."""
    graph, _ = _graph()
    names = ("errors", "conv_spec", "param_count", "latency", "macs", "atomic_files")
    bottom = {f"{PACKAGE}.{name}" for name in names}
    for module in bottom:
        assert graph[module] <= bottom, f"{module} imports {sorted(graph[module] - bottom)}"
