"""The fastlm modules import each other without a cycle.

Function-level imports count: one that closes a cycle only defers it, and the two modules still
cannot be understood (or moved) one without the other.
"""

import ast
from pathlib import Path

import fastlm

PACKAGE = Path(fastlm.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Each fastlm module -> the fastlm modules it imports (``from . import x``, ``from .x import y``),
    at any depth in the file; a name that is no module of the package stands for ``__init__``."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {name: set() for name in modules}
    for name in modules:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    graph[name].add(node.module.split(".")[0])
                else:
                    graph[name] |= {a.name if a.name in modules else "__init__" for a in node.names}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                absolute = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                graph[name] |= {m.split(".")[1] for m in absolute if m.startswith("fastlm.")}
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (first repeated last), or None."""
    done: set[str] = set()

    def visit(path: list[str]) -> list[str] | None:  # path: the modules being visited, the last one now
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(path + [nxt])
                if found:
                    return found
        done.add(path[-1])
        return None

    for start in sorted(graph):
        found = None if start in done else visit([start])
        if found:
            return found
    return None


def test_the_import_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert {"config", "model"} <= graph["__init__"]  # __init__ imports model inside a function
    assert "train" in graph["cli"]  # so does cli
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_fastlm_modules_import_each_other_without_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle among fastlm modules: {' -> '.join(cycle)}"


def test_fastlm_uses_only_the_public_api_of_kernels():
    # kernels' private modules (kernels._library, kernels._backend, ...) may change under fastlm without notice.
    private = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            private += [f"{path.name}: {name}" for name in names
                        if name.startswith("kernels.") and any(p.startswith("_") for p in name.split(".")[1:])]
    assert not private, private
