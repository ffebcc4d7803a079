"""The house's rules, checked on the source: no import cycles in ``node/`` (lazy and type-only
imports count), the plugin's import closure is the standard library, tooling stays outside the
service, and the package's top level stays small."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "node"
PLUGIN = ROOT / "plugins" / "pacs_node_plugin.py"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str) -> tuple[set[str], set[str]]:
    """(node modules, top-level third-party/stdlib names) imported anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    ours: set[str] = set()
    other: set[str] = set()

    def add(mod: str) -> None:
        if mod == "node" or mod.startswith("node."):
            # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c: each is a dependency, except
            # the importer's own packages, which are already initialising when it runs
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                own_package = i < len(parts) and name.startswith(candidate + ".")
                if candidate in MODULES and not own_package:
                    ours.add(candidate)
        else:
            other.add(mod.split(".")[0])

    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                add(a.name)
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            add(mod)
            for a in n.names:  # from node.x import y: y may be a module
                if f"{mod}.{a.name}" in MODULES:
                    add(f"{mod}.{a.name}")
    ours.discard(name)
    return ours, other


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v][0]:
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
            # a package's __init__ and its parent importing each other is normal only when neither
            # imports the other's code; any multi-module component is a cycle
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def _closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += GRAPH[m][0]
    return seen


def test_no_import_cycles_in_node():
    assert _cycles() == []


def test_the_checker_finds_a_cycle():
    """The rule above can fail: a cycle added to the graph is reported."""
    saved = GRAPH["node.errors"]
    GRAPH["node.errors"] = (saved[0] | {"node.pipeline"}, saved[1])
    try:
        assert any("node.errors" in c and "node.pipeline" in c for c in _cycles())
    finally:
        GRAPH["node.errors"] = saved


def test_plugin_imports_only_the_standard_library():
    name = "plugins.pacs_node_plugin"
    ours, other = _imports(PLUGIN, name)
    closure = _closure(ours)
    third_party = {m for m in other if m not in sys.stdlib_module_names and m != "orthanc"}
    for mod in closure:
        third_party |= {m for m in GRAPH[mod][1] if m not in sys.stdlib_module_names}
    # the one exception: psycopg, in the PostgreSQL store only, which the queue opens only for a
    # postgresql:// queue (Orthanc's Python then has Debian's python3-psycopg)
    assert {m for m in closure if "psycopg" in GRAPH[m][1]} <= {"node.service.queue.postgres"}
    third_party -= {"psycopg"}
    assert third_party == set(), f"the plugin would import {sorted(third_party)} via {sorted(closure)}"


def test_service_does_not_import_tooling():
    service = {m for m in MODULES if m.startswith("node.service")}
    leaked = {m for m in _closure(service) if m.startswith("node.tools")}
    assert leaked == set()


def test_jobs_never_touch_the_test_data_generator():
    """On the job path (pipeline and worker) only the precision gate imports the phantoms: its
    calibration set, generated only when a reduced precision has no cached verdict."""
    reach = _closure({"node.pipeline", "node.service.worker"})
    importers = {m for m in reach if any(d.startswith("node.synthetic") for d in GRAPH[m][0])}
    assert importers <= {"node.model.gate"}, importers


def test_top_level_stays_small():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, sorted(top)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_does(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc and len(doc.split()) >= 4, f"{name}: no docstring"
