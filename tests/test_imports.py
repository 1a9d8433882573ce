"""The project's import graph: no circle among the modules of dpo_jax/ and experiments/, and the arrows of
docs/design.md run one way (models/, losses.py, logprobs.py and data/ import nothing above them; data/ never
imports models/).

Every import statement counts, at module level or inside a function (an import inside a function still closes a
circle, it only hides it until the call). Importing a package's name counts as an edge to its `__init__`
(`from dpo_jax.models import Llama`), and `from dpo_jax import data` as an edge to the submodule dpo_jax.data.
"""

from __future__ import annotations

import ast
import functools
import os
from typing import Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dpo_jax", "experiments")

# The pure core and what each part may import from the project (itself included); everything else is above it.
CORE_RULES: dict[str, tuple[str, ...]] = {
    "dpo_jax.models": ("dpo_jax.models",),
    "dpo_jax.losses": ("dpo_jax.losses",),
    "dpo_jax.logprobs": ("dpo_jax.logprobs",),
    "dpo_jax.data": ("dpo_jax.data",),
}


def module_files(root: str = REPO) -> dict[str, str]:
    """{dotted module name: path relative to `root`} of every .py file under PACKAGES (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for directory, subdirectories, files in os.walk(os.path.join(root, package)):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith((".", "__pycache__")))
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.relpath(os.path.join(directory, name), root)
                parts = path[:-len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest project module that `name` (a dotted path, perhaps ending in an attribute) starts with."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: str, modules: dict[str, str], root: str = REPO) -> list[tuple[str, int]]:
    """(imported project module, line) of every import statement in `path` (under `root`), at any depth of the
    file; `modules` are the project's module names."""
    with open(os.path.join(root, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = path.endswith("__init__.py")
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".")
                package = package[:len(package) - (node.level - 1) - (0 if is_package else 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from P import x`: the submodule P.x when there is one, else P itself (its __init__).
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                edges.append((resolved, node.lineno))
    return edges


@functools.lru_cache(maxsize=None)  # parsed once for the tests that read it
def import_graph(root: str = REPO) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """(modules {name: path}, edges {importer: {imported: first line}}) of the project's own imports."""
    modules = module_files(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        graph[module] = {}
        for target, line in imports_of(module, path, modules, root):
            graph[module].setdefault(target, line)
    return modules, graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative): the circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def a_cycle(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """One circle through the first module of `component`: the shortest way back to it (breadth first)."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def describe_cycle(cycle: list[str], modules: dict[str, str], graph: dict[str, dict[str, int]]) -> str:
    """'a (a.py:12) -> b (b.py:40) -> a': each arrow with the file and line of the import that draws it."""
    steps = [f"{a} ({modules[a]}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join([*steps, cycle[-1]])


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(modules: dict[str, str], graph: dict[str, dict[str, int]]) -> list[str]:
    """Each import by a core module (CORE_RULES) of a project module outside what its rule allows."""
    found = []
    for module, targets in sorted(graph.items()):
        for core, allowed in CORE_RULES.items():
            if not _within(module, core):
                continue
            for target, line in sorted(targets.items()):
                if not any(_within(target, prefix) for prefix in allowed):
                    found.append(f"{module} imports {target} ({modules[module]}:{line}); "
                                 f"{core} may import only {', '.join(allowed)}")
    return found


def describe_circles(modules: dict[str, str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A paragraph per circle: its modules, one way round it, and every import between its modules."""
    paragraphs = []
    for component in strongly_connected(graph):
        inside = [f"    {a} -> {b} ({modules[a]}:{line})" for a in component
                  for b, line in sorted(graph[a].items()) if b in component]
        paragraphs.append(f"a circle of {len(component)} modules: "
                          f"{describe_cycle(a_cycle(component, graph), modules, graph)}\n"
                          "  its imports among themselves:\n" + "\n".join(inside))
    return paragraphs


def test_the_project_has_no_import_circle():
    modules, graph = import_graph()
    circles = describe_circles(modules, graph)
    assert not circles, "import circles (each arrow with the file:line of its import):\n" + "\n".join(circles)


def test_the_core_imports_nothing_above_it():
    modules, graph = import_graph()
    violations = layer_violations(modules, graph)
    assert not violations, "arrows back up:\n" + "\n".join(violations)


# --- the checker itself, on a small made-up graph and on import statements of each kind ---------------------------


def test_strongly_connected_finds_each_circle_and_only_circles():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"f": 5}, "f": {"e": 6}, "g": {"a": 7}}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["e", "f"]]
    assert a_cycle(["a", "b", "c"], graph) == ["a", "b", "c", "a"]
    modules = {name: f"{name}.py" for name in graph}
    assert describe_cycle(["e", "f", "e"], modules, graph) == "e (e.py:5) -> f (f.py:6) -> e"
    assert strongly_connected({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []


def test_imports_of_resolves_every_kind_of_statement(tmp_path):
    source = '''
import dpo_jax.losses
import numpy as np
from dpo_jax import run, DEFAULT
from dpo_jax.models import Llama, llama
from . import sibling
from .. import losses as l

def late():
    from dpo_jax.run import build_model  # inside a function: still an edge
    import experiments.sweep.plan
'''
    (tmp_path / "mod.py").write_text(source)
    modules = {name: "" for name in ("dpo_jax", "dpo_jax.losses", "dpo_jax.run", "dpo_jax.models",
                                     "dpo_jax.models.llama", "dpo_jax.models.sibling", "experiments.sweep",
                                     "experiments.sweep.plan", "dpo_jax.models.mod")}
    edges = imports_of("dpo_jax.models.mod", "mod.py", modules, root=str(tmp_path))
    assert edges == [("dpo_jax.losses", 2), ("dpo_jax.run", 4), ("dpo_jax", 4), ("dpo_jax.models", 5),
                     ("dpo_jax.models.llama", 5), ("dpo_jax.models.sibling", 6), ("dpo_jax.losses", 7),
                     ("dpo_jax.run", 10), ("experiments.sweep.plan", 11)]


def test_layer_rules_flag_an_arrow_back_up():
    modules = {name: f"{name.replace('.', '/')}.py" for name in (
        "dpo_jax.models.llama", "dpo_jax.models.layers", "dpo_jax.data.pipeline", "dpo_jax.run")}
    graph = {"dpo_jax.models.llama": {"dpo_jax.models.layers": 3, "dpo_jax.run": 9},
             "dpo_jax.models.layers": {}, "dpo_jax.data.pipeline": {"dpo_jax.models.llama": 4},
             "dpo_jax.run": {"dpo_jax.models.llama": 1}}
    assert layer_violations(modules, graph) == [
        "dpo_jax.data.pipeline imports dpo_jax.models.llama (dpo_jax/data/pipeline.py:4); dpo_jax.data may import "
        "only dpo_jax.data",
        "dpo_jax.models.llama imports dpo_jax.run (dpo_jax/models/llama.py:9); dpo_jax.models may import only "
        "dpo_jax.models"]
